// `meshtrain checkpoint inspect|verify|list`.
#include "checkpoint/checkpoint_command.h"

#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

#include <fmt/ranges.h>

#include "checkpoint/internal.h"  // lib/checkpoint: format_bytes, write_tensors_json
#include "core/json.h"  // lib/checkpoint: the JSON writer the manifests use
#include "meshtrain/checkpoint.h"

namespace meshtrain::tools {
namespace {

namespace fs = std::filesystem;
namespace ck = meshtrain::checkpoint;

const char* const kUsage = R"(usage: meshtrain checkpoint COMMAND PATH [--json]

commands:
  inspect PATH   the manifest: step, world size at save, metadata, blobs, tensors, shards
  verify PATH    reads every shard and checks its size and the SHA-256 of every block
  list ROOT      the step-<N> directories under ROOT, complete (with a manifest) or not

PATH is a checkpoint directory (holding manifest.json) or a root of step-<N> directories, of
which the newest complete one is used. --json prints JSON on stdout instead of text.

Exit codes: 0 ok; 1 damaged, missing or unreadable (verify names every failing shard); 2 usage.
)";

struct Args {
  std::string command;
  fs::path path;
  bool json = false;
};

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--json") {
      a.json = true;
    } else if (arg.rfind("--", 0) == 0) {
      throw InvalidArgumentError(fmt::format("unknown option '{}'\n\n{}", arg, kUsage));
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2)
    throw InvalidArgumentError(fmt::format("expected a command and a path\n\n{}", kUsage));
  a.command = positional[0];
  a.path = positional[1];
  if (a.command != "inspect" && a.command != "verify" && a.command != "list")
    throw InvalidArgumentError(fmt::format("unknown command '{}'\n\n{}", a.command, kUsage));
  return a;
}


std::string utc(int64_t unix_ms) {
  std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  return shape.empty() ? std::string("[]") : fmt::format("[{}]", fmt::join(shape, ", "));
}

void print(const std::string& s) { std::fwrite(s.data(), 1, s.size(), stdout); }

int inspect(const Args& a) {
  ck::Checkpoint c = ck::Checkpoint::open(a.path);
  const ck::Manifest& m = c.manifest();
  if (a.json) {
    json::Writer w;
    w.begin_object();
    w.key("dir").value(c.dir().string());
    w.key("format_version").value(m.format_version);
    w.key("step").value(m.step);
    w.key("save_id").value(m.save_id);
    w.key("created_unix_ms").value(m.created_unix_ms);
    w.key("world_size").value(m.world_size);
    w.key("total_bytes").value(m.total_bytes);
    w.key("block_bytes").value(m.block_bytes);
    w.key("metadata").begin_object();
    for (const auto& [k, v] : m.metadata) w.key(k).value(v);
    w.end_object();
    w.key("blobs").begin_object();
    for (const auto& [k, v] : m.blobs) w.key(k).begin_object(true).key("bytes").value(uint64_t{v.size()}).end_object();
    w.end_object();
    checkpoint::detail::write_tensors_json(w, m.tensors);
    w.key("shards").begin_array();
    for (const auto& s : m.shards) {
      w.begin_object(true).key("rank").value(s.rank).key("file").value(s.file).key("begin").value(s.range.begin);
      w.key("end").value(s.range.end).key("bytes").value(s.range.size());
      w.key("blocks").value(uint64_t{s.block_sha256.size()}).key("sha256").value(crypto::to_hex(s.sha256)).end_object();
    }
    w.end_array();
    w.end_object();
    print(w.take());
    return 0;
  }
  std::string out;
  out += fmt::format("checkpoint   {}\n", c.dir().string());
  out += fmt::format("step         {}\n", m.step);
  out += fmt::format("format       {}\n", m.format_version);
  out += fmt::format("saved        {} by {} writer{} (save id {})\n", utc(m.created_unix_ms), m.world_size,
                     m.world_size == 1 ? "" : "s", m.save_id);
  out += fmt::format("state        {} ({} bytes) in {} tensors, hashed in blocks of {}\n", checkpoint::detail::format_bytes(m.total_bytes),
                     m.total_bytes, m.tensors.size(), checkpoint::detail::format_bytes(m.block_bytes));
  for (const auto& [k, v] : m.metadata) out += fmt::format("metadata     {} = {}\n", k, v);
  for (const auto& [k, v] : m.blobs) out += fmt::format("blob         {} ({} bytes)\n", k, v.size());

  size_t name_w = 6;
  for (const auto& t : m.tensors) name_w = std::max(name_w, t.name.size());
  out += fmt::format("\ntensors\n  {:<{}}  {:<8}  {:<18}  {:>14}  {:>12}\n", "name", name_w, "dtype", "shape", "offset",
                     "bytes");
  for (const auto& t : m.tensors)
    out += fmt::format("  {:<{}}  {:<8}  {:<18}  {:>14}  {:>12}\n", t.name, name_w, dtype_name(t.dtype),
                       shape_text(t.shape), t.offset, t.bytes);
  out += fmt::format("\nshards\n  {:>4}  {:<22}  {:>14}  {:>14}  {:>12}  {}\n", "rank", "file", "begin", "end", "bytes",
                     "sha256 (of the block digests)");
  for (const auto& s : m.shards)
    out += fmt::format("  {:>4}  {:<22}  {:>14}  {:>14}  {:>12}  {}\n", s.rank, s.file, s.range.begin, s.range.end,
                       s.range.size(), crypto::to_hex(s.sha256));
  print(out);
  return 0;
}

int verify(const Args& a) {
  std::optional<ck::Checkpoint> c;
  try {
    c.emplace(ck::Checkpoint::open(a.path));
  } catch (const Error& e) {
    if (!a.json) throw;
    json::Writer w;
    w.begin_object().key("path").value(a.path.string()).key("ok").value(false).key("error").value(e.what()).end_object();
    print(w.take());
    return 1;
  }
  auto checks = c->verify();
  bool ok = true;
  for (const auto& ch : checks) ok = ok && ch.ok;
  if (a.json) {
    json::Writer w;
    w.begin_object();
    w.key("dir").value(c->dir().string()).key("step").value(c->manifest().step).key("ok").value(ok);
    w.key("shards").begin_array();
    for (const auto& ch : checks) {
      w.begin_object(true).key("rank").value(ch.rank).key("file").value(ch.file).key("ok").value(ch.ok);
      if (!ch.ok) w.key("error").value(ch.error);
      w.end_object();
    }
    w.end_array().end_object();
    print(w.take());
    return ok ? 0 : 1;
  }
  std::string out;
  for (const auto& ch : checks) {
    if (ch.ok) {
      out += fmt::format("ok      {}\n", ch.file);
    } else {
      out += fmt::format("FAILED  {}: {}\n", ch.file, ch.error);
    }
  }
  size_t failed = 0;
  for (const auto& ch : checks) failed += ch.ok ? 0 : 1;
  if (ok) {
    out += fmt::format("{}: all {} shards verified ({}, step {})\n", c->dir().string(), checks.size(),
                       checkpoint::detail::format_bytes(c->manifest().total_bytes), c->manifest().step);
  } else {
    out += fmt::format("{}: {} of {} shards failed verification\n", c->dir().string(), failed, checks.size());
  }
  print(out);
  return ok ? 0 : 1;
}

int list(const Args& a) {
  std::error_code ec;
  if (!fs::is_directory(a.path, ec)) throw IoError(fmt::format("{} is not a directory", a.path.string()), ENOENT);
  auto entries = ck::list_checkpoints(a.path);
  if (a.json) {
    json::Writer w;
    w.begin_array();
    for (const auto& e : entries)
      w.begin_object(true).key("step").value(e.step).key("dir").value(e.dir.string()).key("complete").value(e.complete).end_object();
    w.end_array();
    print(w.take());
    return 0;
  }
  std::string out;
  for (const auto& e : entries)
    out += fmt::format("{:<24} {}\n", e.dir.filename().string(), e.complete ? "complete" : "incomplete (ignored)");
  if (entries.empty()) out = fmt::format("no step-<N> directories under {}\n", a.path.string());
  print(out);
  return 0;
}

}  // namespace

int checkpoint_command(int argc, char** argv) {
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  Args a = parse(argc, argv);
  if (a.command == "inspect") return inspect(a);
  if (a.command == "verify") return verify(a);
  return list(a);
}

}  // namespace meshtrain::tools
