// Manifest and shard sidecar JSON: writing, and parsing with validation and limits.
#include <algorithm>
#include <unordered_set>

#include "checkpoint/internal.h"
#include "core/json.h"

namespace meshtrain::checkpoint {

namespace {

constexpr std::string_view kManifestFormat = "meshtrain-checkpoint";
constexpr std::string_view kShardFormat = "meshtrain-checkpoint-shard";

std::optional<DType> parse_dtype(std::string_view name) {
  for (DType d : {DType::Float32, DType::Float16, DType::BFloat16, DType::Int64, DType::UInt8, DType::Int32})
    if (dtype_name(d) == name) return d;
  return std::nullopt;
}

crypto::Digest parse_digest(const json::Field& f) {
  const std::string& s = f.str();
  if (s.size() != 2 * crypto::kSha256Bytes) f.fail(fmt::format("expected 64 hex digits, got {} characters", s.size()));
  crypto::Digest d{};
  for (size_t i = 0; i < d.size(); ++i) {
    auto nibble = [&](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      f.fail("expected 64 hex digits");
    };
    d[i] = static_cast<uint8_t>(nibble(s[2 * i]) << 4 | nibble(s[2 * i + 1]));
  }
  return d;
}

void check_version(const json::Field& root, std::string_view expected_format) {
  json::Field format = root.at("format");
  if (format.str() != expected_format)
    format.fail(fmt::format("expected \"{}\", got \"{}\"", expected_format, format.str()));
  json::Field version = root.at("format_version");
  uint64_t v = version.u64();
  if (v == 0) version.fail("0 is not a valid version");
  if (v > kFormatVersion)
    version.fail(fmt::format("version {} is newer than this reader supports ({}); upgrade meshtrain", v, kFormatVersion));
}

uint64_t parse_block_bytes(const json::Field& f) {
  uint64_t b = f.u64();
  if (b < 4096 || b > (1ull << 30) || b % kAlignmentBytes != 0)
    f.fail(fmt::format("{} is not a multiple of 64 between 4096 and 2^30", b));
  return b;
}

const std::string& parse_save_id(const json::Field& f) {
  const std::string& s = f.str();
  if (s.size() > 256) f.fail(fmt::format("{} bytes is over the limit of 256", s.size()));
  return s;
}

// The fields a shard entry and a sidecar share: rank, file, begin, end, bytes, sha256,
// block_sha256. Checks the block list against the size and the digest against the list.
ShardInfo parse_shard(const json::Field& f, uint32_t world_size, uint64_t block_bytes) {
  ShardInfo s;
  json::Field rank = f.at("rank");
  s.rank = static_cast<uint32_t>(rank.u64(world_size == 0 ? 0 : world_size - 1));
  json::Field file = f.at("file");
  s.file = file.str();
  // The name is fixed by rank and world size; anything else (a path, "..") is refused, so a
  // manifest cannot make a reader open files outside the checkpoint directory.
  if (s.file != detail::shard_file_name(s.rank, world_size))
    file.fail(fmt::format("expected \"{}\", got \"{}\"", detail::shard_file_name(s.rank, world_size), s.file));
  s.range.begin = f.at("begin").u64();
  json::Field end = f.at("end");
  s.range.end = end.u64();
  if (s.range.end < s.range.begin) end.fail(fmt::format("{} is before begin {}", s.range.end, s.range.begin));
  json::Field bytes = f.at("bytes");
  if (bytes.u64() != s.range.size())
    bytes.fail(fmt::format("{} does not match end - begin = {}", bytes.u64(), s.range.size()));
  uint64_t expected_blocks = (s.range.size() + block_bytes - 1) / block_bytes;
  json::Field blocks = f.at("block_sha256");
  size_t n = blocks.array_size();
  if (n != expected_blocks)
    blocks.fail(fmt::format("has {} entries; {} bytes in blocks of {} need {}", n, s.range.size(), block_bytes,
                            expected_blocks));
  s.block_sha256.reserve(n);
  for (size_t i = 0; i < n; ++i) s.block_sha256.push_back(parse_digest(blocks.at(i)));
  json::Field digest = f.at("sha256");
  s.sha256 = parse_digest(digest);
  if (s.sha256 != detail::digest_of_blocks(s.block_sha256))
    digest.fail("does not match the SHA-256 of its block_sha256 list");
  return s;
}

void write_shard_fields(json::Writer& w, const ShardInfo& s) {
  w.key("rank").value(s.rank);
  w.key("file").value(s.file);
  w.key("begin").value(s.range.begin);
  w.key("end").value(s.range.end);
  w.key("bytes").value(s.range.size());
  w.key("sha256").value(detail::digest_hex(s.sha256));
  w.key("block_sha256").begin_array();
  for (const auto& b : s.block_sha256) w.value(detail::digest_hex(b));
  w.end_array();
}

}  // namespace

void detail::write_tensors_json(json::Writer& w, const std::vector<TensorInfo>& tensors) {
  w.key("tensors").begin_array();
  for (const auto& t : tensors) {
    w.begin_object(true).key("name").value(t.name).key("dtype").value(dtype_name(t.dtype)).key("shape").begin_array();
    for (int64_t d : t.shape) w.value(d);
    w.end_array().key("offset").value(t.offset).key("bytes").value(t.bytes).end_object();
  }
  w.end_array();
}

std::string manifest_to_json(const Manifest& m) {
  json::Writer w;
  w.begin_object();
  w.key("format").value(kManifestFormat);
  w.key("format_version").value(m.format_version);
  w.key("step").value(m.step);
  w.key("save_id").value(m.save_id);
  w.key("created_unix_ms").value(m.created_unix_ms);
  w.key("world_size").value(m.world_size);
  w.key("total_bytes").value(m.total_bytes);
  w.key("alignment").value(kAlignmentBytes);
  w.key("block_bytes").value(m.block_bytes);
  w.key("hash").value("sha256");
  w.key("metadata").begin_object();
  for (const auto& [k, v] : m.metadata) w.key(k).value(v);
  w.end_object();
  w.key("blobs").begin_object();
  for (const auto& [k, v] : m.blobs) {
    w.key(k).begin_object(true).key("bytes").value(static_cast<uint64_t>(v.size()));
    w.key("base64").value(json::base64_encode(v.data(), v.size())).end_object();
  }
  w.end_object();
  detail::write_tensors_json(w, m.tensors);
  w.key("shards").begin_array();
  for (const auto& s : m.shards) {
    w.begin_object();
    write_shard_fields(w, s);
    w.end_object();
  }
  w.end_array();
  w.end_object();
  return w.take();
}

Manifest parse_manifest(std::string_view text, std::string_view source, const ManifestLimits& limits) {
  json::ParseLimits pl;
  pl.max_bytes = limits.max_manifest_bytes;
  json::Value doc = json::parse(text, source, pl);
  json::Field root(doc, source);
  root.object();
  check_version(root, kManifestFormat);
  root.only_keys({"format", "format_version", "step", "save_id", "created_unix_ms", "world_size", "total_bytes",
                  "alignment", "block_bytes", "hash", "metadata", "blobs", "tensors", "shards"});
  Manifest m;
  m.format_version = static_cast<uint32_t>(root.at("format_version").u64());
  m.step = root.at("step").u64();
  m.save_id = parse_save_id(root.at("save_id"));
  m.created_unix_ms = root.at("created_unix_ms").i64();
  json::Field world = root.at("world_size");
  m.world_size = static_cast<uint32_t>(world.u64(limits.max_world_size));
  if (m.world_size == 0) world.fail("must be at least 1");
  json::Field total = root.at("total_bytes");
  m.total_bytes = total.u64(limits.max_total_bytes);
  json::Field alignment = root.at("alignment");
  if (alignment.u64() != kAlignmentBytes) alignment.fail(fmt::format("expected {}", kAlignmentBytes));
  m.block_bytes = parse_block_bytes(root.at("block_bytes"));
  json::Field hash = root.at("hash");
  if (hash.str() != "sha256") hash.fail(fmt::format("unknown hash \"{}\" (expected \"sha256\")", hash.str()));

  json::Field metadata = root.at("metadata");
  const json::Value& mo = metadata.object();
  size_t meta_bytes = 0;
  for (size_t i = 0; i < mo.keys.size(); ++i) {
    if (auto fault = detail::name_fault(mo.keys[i])) metadata.fail(fmt::format("key {}", *fault));
    json::Field v = metadata.at(mo.keys[i]);
    meta_bytes += mo.keys[i].size() + v.str().size();
    if (meta_bytes > limits.max_metadata_bytes)
      metadata.fail(fmt::format("over the limit of {} bytes", limits.max_metadata_bytes));
    m.metadata.emplace(mo.keys[i], v.str());
  }

  json::Field blobs = root.at("blobs");
  const json::Value& bo = blobs.object();
  size_t blob_bytes = 0;
  for (size_t i = 0; i < bo.keys.size(); ++i) {
    if (auto fault = detail::name_fault(bo.keys[i])) blobs.fail(fmt::format("name {}", *fault));
    json::Field b = blobs.at(bo.keys[i]);
    b.only_keys({"bytes", "base64"});
    json::Field size = b.at("bytes");
    uint64_t n = size.u64(limits.max_blob_bytes);
    blob_bytes += n;
    if (blob_bytes > limits.max_blob_bytes) blobs.fail(fmt::format("over the limit of {} bytes", limits.max_blob_bytes));
    json::Field text = b.at("base64");
    std::vector<uint8_t> bytes = json::base64_decode(text.str(), fmt::format("{}: field {}", source, text.path()));
    if (bytes.size() != n) size.fail(fmt::format("says {} bytes, base64 holds {}", n, bytes.size()));
    m.blobs.emplace(bo.keys[i], std::move(bytes));
  }

  json::Field tensors = root.at("tensors");
  size_t nt = tensors.array_size();
  if (nt > limits.max_tensors) tensors.fail(fmt::format("{} tensors is over the limit of {}", nt, limits.max_tensors));
  m.tensors.reserve(nt);
  std::unordered_set<std::string_view> names;
  uint64_t prev_end = 0;
  for (size_t i = 0; i < nt; ++i) {
    json::Field f = tensors.at(i);
    f.only_keys({"name", "dtype", "shape", "offset", "bytes"});
    TensorInfo t;
    json::Field name = f.at("name");
    t.name = name.str();
    if (auto fault = detail::name_fault(t.name)) name.fail(*fault);
    json::Field dtype = f.at("dtype");
    auto d = parse_dtype(dtype.str());
    if (!d) dtype.fail(fmt::format("unknown dtype \"{}\"", dtype.str()));
    t.dtype = *d;
    json::Field shape = f.at("shape");
    size_t dims = shape.array_size();
    if (dims > limits.max_dims) shape.fail(fmt::format("{} dimensions is over the limit of {}", dims, limits.max_dims));
    uint64_t elements = 1;
    for (size_t j = 0; j < dims; ++j) {
      json::Field dim = shape.at(j);
      uint64_t v = dim.u64(static_cast<uint64_t>(INT64_MAX));
      if (v != 0 && elements > limits.max_total_bytes / v) dim.fail("the shape's product is too large");
      elements *= v;
      t.shape.push_back(static_cast<int64_t>(v));
    }
    if (std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end()) elements = 0;
    json::Field bytes = f.at("bytes");
    t.bytes = bytes.u64(limits.max_total_bytes);
    if (elements > limits.max_total_bytes / dtype_size(t.dtype) || elements * dtype_size(t.dtype) != t.bytes)
      bytes.fail(fmt::format("{} does not match the shape ({} elements of {})", t.bytes, elements, dtype_name(t.dtype)));
    json::Field offset = f.at("offset");
    t.offset = offset.u64(limits.max_total_bytes);
    if (t.offset % kAlignmentBytes != 0) offset.fail(fmt::format("{} is not a multiple of {}", t.offset, kAlignmentBytes));
    if (t.offset < prev_end) offset.fail(fmt::format("{} overlaps the previous tensor (which ends at {})", t.offset, prev_end));
    if (t.offset + t.bytes > m.total_bytes)
      offset.fail(fmt::format("tensor ends at {}, past total_bytes {}", t.offset + t.bytes, m.total_bytes));
    prev_end = t.offset + t.bytes;
    m.tensors.push_back(std::move(t));
    if (!names.insert(m.tensors.back().name).second) name.fail(fmt::format("duplicate tensor name \"{}\"", m.tensors.back().name));
  }

  json::Field shards = root.at("shards");
  size_t ns = shards.array_size();
  if (ns != m.world_size) shards.fail(fmt::format("has {} entries, world_size is {}", ns, m.world_size));
  m.shards.reserve(ns);
  uint64_t pos = 0;
  for (size_t i = 0; i < ns; ++i) {
    json::Field f = shards.at(i);
    f.only_keys({"rank", "file", "begin", "end", "bytes", "sha256", "block_sha256"});
    ShardInfo s = parse_shard(f, m.world_size, m.block_bytes);
    if (s.rank != i) f.at("rank").fail(fmt::format("expected {} (shards are listed in rank order)", i));
    if (s.range.begin != pos) f.at("begin").fail(fmt::format("expected {} (ranges must be contiguous)", pos));
    if (s.range.end > m.total_bytes) f.at("end").fail(fmt::format("{} is past total_bytes {}", s.range.end, m.total_bytes));
    pos = s.range.end;
    m.shards.push_back(std::move(s));
  }
  if (pos != m.total_bytes) shards.fail(fmt::format("cover {} bytes, total_bytes is {}", pos, m.total_bytes));
  return m;
}

std::string shard_record_to_json(const ShardRecord& r) {
  json::Writer w;
  w.begin_object();
  w.key("format").value(kShardFormat);
  w.key("format_version").value(kFormatVersion);
  w.key("save_id").value(r.save_id);
  w.key("step").value(r.step);
  w.key("world_size").value(r.world_size);
  w.key("block_bytes").value(r.block_bytes);
  w.key("layout_sha256").value(detail::digest_hex(r.layout_sha256));
  write_shard_fields(w, r.shard);
  w.end_object();
  return w.take();
}

ShardRecord parse_shard_record(std::string_view text, std::string_view source, const ManifestLimits& limits) {
  json::ParseLimits pl;
  pl.max_bytes = limits.max_manifest_bytes;
  json::Value doc = json::parse(text, source, pl);
  json::Field root(doc, source);
  root.object();
  check_version(root, kShardFormat);
  root.only_keys({"format", "format_version", "save_id", "step", "world_size", "block_bytes", "layout_sha256", "rank",
                  "file", "begin", "end", "bytes", "sha256", "block_sha256"});
  ShardRecord r;
  r.save_id = parse_save_id(root.at("save_id"));
  r.step = root.at("step").u64();
  json::Field world = root.at("world_size");
  r.world_size = static_cast<uint32_t>(world.u64(limits.max_world_size));
  if (r.world_size == 0) world.fail("must be at least 1");
  r.block_bytes = parse_block_bytes(root.at("block_bytes"));
  r.layout_sha256 = parse_digest(root.at("layout_sha256"));
  r.shard = parse_shard(root, r.world_size, r.block_bytes);
  return r;
}

}  // namespace meshtrain::checkpoint
