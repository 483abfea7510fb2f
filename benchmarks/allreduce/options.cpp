#include "options.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <map>
#include <optional>

#include <fmt/format.h>

#include "common/flags.h"
#include "meshtrain/compress.h"

namespace meshtrain::bench {

namespace {

long long parse_int(const std::string& flag, const std::string& text, long long min, long long max) {
  long long v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size())
    throw UsageError(fmt::format("{}: '{}' is not a whole number", flag, text));
  if (v < min || v > max) throw UsageError(fmt::format("{}: {} is out of range ({}..{})", flag, v, min, max));
  return v;
}

// Splits "123.5unit" into its number and its lower-cased unit.
std::pair<double, std::string> number_and_unit(const std::string& flag, const std::string& text) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) throw UsageError(fmt::format("{}: '{}' does not start with a number", flag, text));
  double v = 0;
  try {
    size_t used = 0;
    v = std::stod(text.substr(0, i), &used);
    if (used != i) throw std::invalid_argument("partial");
  } catch (const std::exception&) {
    throw UsageError(fmt::format("{}: '{}' is not a number", flag, text));
  }
  std::string unit;
  for (char c : text.substr(i)) unit += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return {v, unit};
}

std::map<std::string, std::string> key_values(const std::string& flag, const std::string& text) {
  std::map<std::string, std::string> out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    auto eq = item.find('=');
    if (item.empty() || eq == std::string::npos || eq == 0)
      throw UsageError(fmt::format("{}: '{}' is not a list of key=value items", flag, text));
    if (!out.emplace(item.substr(0, eq), item.substr(eq + 1)).second)
      throw UsageError(fmt::format("{}: '{}' is given twice", flag, item.substr(0, eq)));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace

uint64_t parse_bytes(const std::string& flag, const std::string& text) {
  auto [v, unit] = number_and_unit(flag, text);
  double mult = 0;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k" || unit == "kib" || unit == "kb") mult = 1024.0;
  else if (unit == "m" || unit == "mib" || unit == "mb") mult = 1024.0 * 1024;
  else if (unit == "g" || unit == "gib" || unit == "gb") mult = 1024.0 * 1024 * 1024;
  else throw UsageError(fmt::format("{}: unknown unit in '{}' (bytes, KiB, MiB, GiB)", flag, text));
  double bytes = v * mult;
  if (bytes != std::floor(bytes) || bytes > 1e15)
    throw UsageError(fmt::format("{}: '{}' is not a whole number of bytes", flag, text));
  return static_cast<uint64_t>(bytes);
}

WanSpec parse_wan(const std::string& text) {
  const std::string flag = "--wan";
  WanSpec w;
  w.text = text;
  auto kv = key_values(flag, text);
  for (const auto& [k, v] : kv)
    if (k != "hosts" && k != "rate" && k != "delay")
      throw UsageError(fmt::format("--wan: unknown key '{}' (hosts, rate, delay)", k));
  if (!kv.count("hosts") || !kv.count("rate"))
    throw UsageError("--wan needs at least hosts=K and rate=R, e.g. --wan hosts=4,rate=200mbit,delay=50ms");
  w.hosts = static_cast<int>(parse_int("--wan hosts", kv["hosts"], 1, 254));
  auto [rate, runit] = number_and_unit("--wan rate", kv["rate"]);
  if (runit == "kbit") rate /= 1000;
  else if (runit == "gbit") rate *= 1000;
  else if (!runit.empty() && runit != "mbit")
    throw UsageError(fmt::format("--wan rate: unknown unit in '{}' (kbit, mbit, gbit; bare = mbit)", kv["rate"]));
  if (!(rate > 0)) throw UsageError("--wan rate must be positive");
  w.rate_mbit = rate;
  if (kv.count("delay")) {
    auto [d, dunit] = number_and_unit("--wan delay", kv["delay"]);
    double us = 0;
    if (dunit == "ms" || dunit.empty()) us = d * 1000;
    else if (dunit == "us") us = d;
    else if (dunit == "s") us = d * 1e6;
    else throw UsageError(fmt::format("--wan delay: unknown unit in '{}' (us, ms, s; bare = ms)", kv["delay"]));
    if (us > 10e6) throw UsageError("--wan delay: at most 10 s");
    w.delay = std::chrono::microseconds(static_cast<int64_t>(std::llround(us)));
  }
  return w;
}

FaultSpec parse_fault(const std::string& text) {
  FaultSpec f;
  f.text = text;
  auto kv = key_values("--fault", text);
  for (const auto& [k, v] : kv)
    if (k != "kill-during" && k != "iteration" && k != "victim" && k != "ring-step")
      throw UsageError(fmt::format("--fault: unknown key '{}' (kill-during, iteration, victim, ring-step)", k));
  if (!kv.count("kill-during"))
    throw UsageError("--fault needs kill-during=reduce_scatter or kill-during=all_gather");
  f.phase = kv["kill-during"];
  if (f.phase != "reduce_scatter" && f.phase != "all_gather")
    throw UsageError(fmt::format("--fault kill-during: '{}' is not a phase (reduce_scatter, all_gather)", f.phase));
  if (kv.count("iteration")) f.iteration = static_cast<int>(parse_int("--fault iteration", kv["iteration"], 0, 1 << 20));
  if (kv.count("victim")) f.victim = static_cast<int>(parse_int("--fault victim", kv["victim"], 0, 1 << 20));
  if (kv.count("ring-step")) f.ring_step = static_cast<size_t>(parse_int("--fault ring-step", kv["ring-step"], 0, 1 << 14));
  return f;
}

AllreduceOptions parse_allreduce_args(const std::vector<std::string>& args) {
  static const std::initializer_list<tools::Flags::Spec> kFlags = {
      {"--peers"}, {"--size"}, {"--bytes"}, {"--repeats"}, {"--warmup"}, {"--streams"}, {"--chunk-bytes"},
      {"--plain", false}, {"--encrypted", false}, {"--baseline"}, {"--wan"}, {"--fault"}, {"--reduce-step", false},
      {"--codec"}, {"--shape"}, {"--sparse-gather"}, {"--exchange"}, {"--device"}, {"--pageable-staging", false},
      {"--timeout-s"},
      {"--heartbeat-timeout-ms"},
      {"--python"}, {"--gloo-script"}, {"--netns-script"}, {"--verbose", false}};
  std::vector<std::string> storage = args;
  std::vector<char*> argv;
  for (auto& a : storage) argv.push_back(a.data());
  std::optional<tools::Flags> parsed;
  try {
    parsed.emplace(static_cast<int>(argv.size()), argv.data(), 0, kFlags, "");
    if (!parsed->positional().empty()) parsed->fail(fmt::format("unexpected argument '{}'", parsed->positional()[0]));
    if (parsed->help()) parsed->fail("--help goes before the benchmark's name: meshtrain-bench --help");
  } catch (const InvalidArgumentError& e) {
    throw UsageError(e.what());
  }
  const tools::Flags& f = *parsed;
  auto text = [&](std::string_view name) { return f.get(name); };
  auto integer = [&](std::string_view name, long long min, long long max) {
    return parse_int(std::string(name), *f.get(name), min, max);
  };

  AllreduceOptions o;
  const bool have_peers = f.has("--peers"), have_size = f.has("--size") || f.has("--bytes");
  const bool plain = f.has("--plain"), encrypted = f.has("--encrypted");
  if (have_peers) o.peers = static_cast<int>(integer("--peers", 2, 254));
  if (auto v = text("--size")) o.bytes = parse_bytes("--size", *v);
  if (auto v = text("--bytes")) o.bytes = parse_bytes("--bytes", *v);
  if (f.has("--repeats")) o.repeats = static_cast<int>(integer("--repeats", 1, 100000));
  if (f.has("--warmup")) o.warmup = static_cast<int>(integer("--warmup", 0, 100000));
  if (f.has("--streams")) o.streams = static_cast<uint32_t>(integer("--streams", 1, 64));
  if (auto v = text("--chunk-bytes")) {
    o.chunk_bytes = parse_bytes("--chunk-bytes", *v);
    if (o.chunk_bytes < 4096) throw UsageError("--chunk-bytes: at least 4096");
  }
  if (auto v = text("--baseline")) {
    o.baseline = *v;
    if (*o.baseline != "gloo") throw UsageError(fmt::format("--baseline: '{}' is not known (gloo)", *o.baseline));
  }
  if (auto v = text("--wan")) o.wan = parse_wan(*v);
  if (auto v = text("--fault")) o.fault = parse_fault(*v);
  o.reduce_step = f.has("--reduce-step");
  if (auto v = text("--codec")) {
    o.codec = *v;
    try {
      compress::make_codec(*o.codec);
    } catch (const InvalidArgumentError& e) {
      throw UsageError(fmt::format("--codec: {}", e.what()));
    }
  }
  if (auto v = text("--shape")) {
    o.shape = *v;
    const size_t x = o.shape->find('x');
    if (x == std::string::npos || x == 0 || x + 1 == o.shape->size() ||
        o.shape->find_first_not_of("0123456789x") != std::string::npos || o.shape->find('x', x + 1) != std::string::npos)
      throw UsageError(fmt::format("--shape: '{}' is not ROWSxCOLS", *o.shape));
  }
  if (auto v = text("--sparse-gather")) {
    o.sparse_gather = *v;
    if (o.sparse_gather != "auto" && o.sparse_gather != "owner" && o.sparse_gather != "allgather")
      throw UsageError(fmt::format("--sparse-gather: '{}' (auto, owner, allgather)", o.sparse_gather));
  }
  if (auto v = text("--exchange")) {
    o.exchange = *v;
    if (o.exchange != "direct" && o.exchange != "ring")
      throw UsageError(fmt::format("--exchange: '{}' (direct, ring)", o.exchange));
    if (!o.codec) throw UsageError("--exchange only matters with --codec (the compressed all-reduce)");
  }
  if (auto v = text("--device")) {
    o.device = *v;
    if (o.device != "cpu" && o.device != "cuda") throw UsageError(fmt::format("--device: '{}' (cpu, cuda)", o.device));
  }
  o.pageable_staging = f.has("--pageable-staging");
  if (o.pageable_staging && o.device != "cuda")
    throw UsageError("--pageable-staging only matters with --device cuda (host copies of CUDA buffers)");
  if (f.has("--timeout-s")) o.timeout_s = static_cast<int>(integer("--timeout-s", 1, 24 * 3600));
  if (f.has("--heartbeat-timeout-ms"))
    o.heartbeat_timeout_ms = static_cast<int>(integer("--heartbeat-timeout-ms", 100, 600000));
  if (auto v = text("--python")) o.python = *v;
  if (auto v = text("--gloo-script")) o.gloo_script = *v;
  if (auto v = text("--netns-script")) o.netns_script = *v;
  o.keep_logs = f.has("--verbose");
  if (!have_peers) throw UsageError("--peers N is required");
  if (!have_size) throw UsageError("--size BYTES is required");
  if (o.bytes == 0 || o.bytes % 4 != 0)
    throw UsageError(fmt::format("--size: {} bytes is not a positive multiple of 4 (float32 elements)", o.bytes));
  if (plain || encrypted) {
    o.plain = plain;
    o.encrypted = encrypted;
  }
  if (o.fault) o.reduce_step = true;
  if (o.shape) {
    const size_t x = o.shape->find('x');
    const uint64_t rows = std::stoull(o.shape->substr(0, x)), cols = std::stoull(o.shape->substr(x + 1));
    if (rows == 0 || cols == 0 || rows * cols * 4 != o.bytes)
      throw UsageError(fmt::format("--shape {} holds {} floats; --size {} is {} floats", *o.shape, rows * cols, o.bytes,
                                   o.bytes / 4));
    if (!o.codec) throw UsageError("--shape only matters with --codec (PowerSGD's matrix view)");
  }
  if (o.reduce_step && o.baseline)
    throw UsageError("--baseline gloo times a plain all_reduce; it does not combine with --reduce-step or --fault");
  if (o.fault) {
    if (o.peers < 3)
      throw UsageError("--fault needs at least 3 peers (the survivors must still form a ring of 2 or more)");
    if (o.fault->ring_step + 1 >= static_cast<size_t>(o.peers))
      throw UsageError(fmt::format("--fault ring-step: {} but a ring of {} peers has steps 0..{}", o.fault->ring_step,
                                   o.peers, o.peers - 2));
    if (o.fault_victim() >= o.peers)
      throw UsageError(fmt::format("--fault victim: {} but there are {} workers", o.fault_victim(), o.peers));
    int total = o.warmup + o.repeats;
    if (o.fault_iteration() >= total - 1)
      throw UsageError(fmt::format("--fault iteration: {} leaves no iteration after the fault (there are {})",
                                   o.fault_iteration(), total));
    if (o.fault_iteration() < o.warmup + 1)
      throw UsageError(fmt::format("--fault iteration: {} leaves no timed iteration before the fault (warmup {})",
                                   o.fault_iteration(), o.warmup));
    if (o.baseline) throw UsageError("--baseline and --fault do not combine (the baseline has no fault mode)");
  }
  if (o.device == "cuda" && o.baseline)
    throw UsageError("--baseline gloo reduces CPU tensors; it does not combine with --device cuda");
  if (o.wan) {
    if (o.baseline) throw UsageError("--baseline gloo runs on loopback only; drop --wan or --baseline");
  }
  return o;
}

}  // namespace meshtrain::bench
