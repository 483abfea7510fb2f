// The global byte stream: tensor layout, balanced partition, segments over tensors and padding.
#include <algorithm>
#include <bit>
#include <cstring>
#include <unordered_set>

#include "checkpoint/internal.h"
#include "core/json.h"

namespace meshtrain::checkpoint {

namespace {

uint64_t align_up(uint64_t v) { return (v + kAlignmentBytes - 1) / kAlignmentBytes * kAlignmentBytes; }

void check_name(std::string_view name, std::string_view what) {
  if (std::optional<std::string> fault = detail::name_fault(name))
    throw InvalidArgumentError(fmt::format("{} name {}", what, *fault));
}

}  // namespace

std::optional<std::string> detail::name_fault(std::string_view name) {
  auto printable = [](std::string_view text) {  // control characters as \xNN, not raw into a terminal
    std::string out;
    for (char c : text) {
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
        out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
      else
        out += c;
    }
    return out;
  };
  if (name.empty()) return "is empty";
  if (name.size() > 1024) return fmt::format("of {} bytes is over the limit of 1024", name.size());
  if (!json::valid_utf8(name)) return "is not valid UTF-8";
  for (char c : name)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      return fmt::format("\"{}\" contains a control character", printable(name));
  return std::nullopt;
}

ByteRange partition(uint64_t total_bytes, uint32_t rank, uint32_t world_size) {
  if (world_size == 0 || rank >= world_size)
    throw InvalidArgumentError(fmt::format("partition: rank {} of world size {}", rank, world_size));
  auto cut = [&](uint32_t r) -> uint64_t {
    if (r == 0) return 0;
    if (r == world_size) return total_bytes;
    unsigned __int128 v = static_cast<unsigned __int128>(total_bytes) * r / world_size;
    return static_cast<uint64_t>(v) / kAlignmentBytes * kAlignmentBytes;
  };
  return {cut(rank), cut(rank + 1)};
}

const TensorInfo* Manifest::find_tensor(std::string_view name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

std::vector<TensorInfo> plan_layout(const State& state, uint64_t* total_bytes) {
  detail::Layout layout = detail::make_layout(state);
  if (total_bytes) *total_bytes = layout.total_bytes;
  return std::move(layout.tensors);
}

namespace detail {

Layout make_layout(const State& state) {
  Layout layout;
  layout.tensors.reserve(state.tensors.size());
  std::unordered_set<std::string_view> names;
  uint64_t end = 0;
  for (size_t i = 0; i < state.tensors.size(); ++i) {
    const TensorView& t = state.tensors[i];
    check_name(t.name, fmt::format("tensor {}", i));
    if (!names.insert(t.name).second) throw InvalidArgumentError(fmt::format("tensor \"{}\" appears twice", t.name));
    if (t.shape.size() > 16)
      throw InvalidArgumentError(fmt::format("tensor \"{}\" has {} dimensions (at most 16)", t.name, t.shape.size()));
    uint64_t elements = 1;
    for (int64_t d : t.shape) {
      if (d < 0) throw InvalidArgumentError(fmt::format("tensor \"{}\" has a negative dimension {}", t.name, d));
      if (d != 0 && elements > UINT64_MAX / static_cast<uint64_t>(d))
        throw InvalidArgumentError(fmt::format("tensor \"{}\": shape overflows 64 bits", t.name));
      elements *= static_cast<uint64_t>(d);
    }
    if (elements != t.buffer.count)
      throw InvalidArgumentError(fmt::format("tensor \"{}\": buffer has {} elements, shape says {}", t.name,
                                             t.buffer.count, elements));
    if (t.buffer.device != DeviceKind::Cpu)
      throw InvalidArgumentError(fmt::format(
          "tensor \"{}\" is in GPU memory: copy it to host memory first (checkpoints read CPU buffers)", t.name));
    size_t esize = dtype_size(t.buffer.dtype);
    if (elements > (1ull << 62) / esize) throw InvalidArgumentError(fmt::format("tensor \"{}\" is too large", t.name));
    uint64_t bytes = elements * esize;
    if (bytes > 0 && t.buffer.data == nullptr)
      throw InvalidArgumentError(fmt::format("tensor \"{}\" has a null data pointer", t.name));
    uint64_t offset = align_up(end);
    layout.tensors.push_back(TensorInfo{t.name, t.buffer.dtype, t.shape, offset, bytes});
    end = offset + bytes;
  }
  layout.total_bytes = end;
  return layout;
}

crypto::Digest layout_digest(const std::vector<TensorInfo>& tensors, uint64_t total_bytes, uint64_t block_bytes) {
  json::Writer w(false);
  w.begin_object().key("total_bytes").value(total_bytes).key("block_bytes").value(block_bytes).key("tensors").begin_array();
  for (const auto& t : tensors) {
    w.begin_array().value(t.name).value(dtype_name(t.dtype)).begin_array();
    for (int64_t d : t.shape) w.value(d);
    w.end_array().value(t.offset).value(t.bytes).end_array();
  }
  w.end_array().end_object();
  std::string s = w.take();
  return crypto::sha256({reinterpret_cast<const uint8_t*>(s.data()), s.size()});
}

void check_block_bytes(uint64_t block_bytes) {
  if (block_bytes < 4096 || block_bytes > (1ull << 30) || block_bytes % kAlignmentBytes != 0)
    throw InvalidArgumentError(
        fmt::format("block_bytes {} must be a multiple of 64 between 4 KiB and 1 GiB", block_bytes));
}

void check_manifest_fits(const Layout& layout, uint64_t block_bytes, const ManifestLimits& limits) {
  if (layout.tensors.size() > limits.max_tensors)
    throw InvalidArgumentError(fmt::format("checkpoint save: {} tensors; readers accept at most {}",
                                           layout.tensors.size(), limits.max_tensors));
  if (layout.total_bytes > limits.max_total_bytes)
    throw InvalidArgumentError(fmt::format("checkpoint save: {} bytes of tensors; readers accept at most {}",
                                           layout.total_bytes, limits.max_total_bytes));
  // The manifest lists every block's digest ("<64 hex digits>", one JSON value each; there are
  // at least total / block_bytes of them, more where shards end inside a block) and every
  // tensor: a lower bound of its size, so that a save readers would refuse fails now rather
  // than after writing every shard (the exact check runs before the commit).
  const uint64_t blocks = (layout.total_bytes + block_bytes - 1) / block_bytes;
  uint64_t bytes = blocks * 67, values = blocks;
  for (const TensorInfo& t : layout.tensors) {
    bytes += t.name.size() + 64;
    values += 6 + t.shape.size();
  }
  const json::ParseLimits parse;
  if (bytes > limits.max_manifest_bytes || values > parse.max_values) {
    const uint64_t room = std::min<uint64_t>(limits.max_manifest_bytes / 67, parse.max_values);
    const uint64_t fitting = std::max<uint64_t>(1, room / 2);  // blocks, with room to spare
    throw InvalidArgumentError(fmt::format(
        "checkpoint save: {} bytes in blocks of {} make a manifest of at least {} bytes and {} JSON values; readers "
        "accept {} bytes and {} values: use larger blocks (block_bytes >= {})",
        layout.total_bytes, block_bytes, bytes, values, limits.max_manifest_bytes, parse.max_values,
        std::bit_ceil(std::max<uint64_t>(4096, layout.total_bytes / fitting))));
  }
}

Layout layout_for_save(const State& state, const SaveOptions& o) {
  Layout layout = make_layout(state);
  check_metadata(state.metadata, state.blobs, ManifestLimits{});
  check_manifest_fits(layout, o.block_bytes, ManifestLimits{});
  return layout;
}

void check_metadata(const std::map<std::string, std::string>& metadata,
                    const std::map<std::string, std::vector<uint8_t>>& blobs, const ManifestLimits& limits) {
  size_t meta_bytes = 0;
  for (const auto& [k, v] : metadata) {
    check_name(k, "metadata key");
    if (!json::valid_utf8(v))
      throw InvalidArgumentError(fmt::format("metadata \"{}\": value is not valid UTF-8 (put bytes in blobs)", k));
    meta_bytes += k.size() + v.size();
  }
  if (meta_bytes > limits.max_metadata_bytes)
    throw InvalidArgumentError(fmt::format("metadata of {} bytes is over the limit of {} bytes", meta_bytes,
                                           limits.max_metadata_bytes));
  size_t blob_bytes = 0;
  for (const auto& [k, v] : blobs) {
    check_name(k, "blob");
    blob_bytes += v.size();
  }
  if (blob_bytes > limits.max_blob_bytes)
    throw InvalidArgumentError(fmt::format(
        "blobs of {} bytes together are over the limit of {} bytes (store large state as tensors)", blob_bytes,
        limits.max_blob_bytes));
}

void StateSource::segments(ByteRange range, std::vector<Segment>& out) const {
  out.clear();
  const auto& ts = layout_.tensors;
  // First tensor that ends after range.begin.
  auto it = std::upper_bound(ts.begin(), ts.end(), range.begin,
                             [](uint64_t pos, const TensorInfo& t) { return pos < t.offset + t.bytes; });
  uint64_t pos = range.begin;
  for (; it != ts.end() && pos < range.end; ++it) {
    if (it->bytes == 0) continue;
    if (it->offset > pos) {  // padding before this tensor
      uint64_t pad_end = std::min(it->offset, range.end);
      out.push_back({pos, pad_end - pos, nullptr});
      pos = pad_end;
      if (pos >= range.end) break;
    }
    uint64_t end = std::min(it->offset + it->bytes, range.end);
    const auto* base = static_cast<const uint8_t*>(state_.tensors[static_cast<size_t>(it - ts.begin())].buffer.data);
    out.push_back({pos, end - pos, base + (pos - it->offset)});
    pos = end;
  }
  if (pos < range.end) out.push_back({pos, range.end - pos, nullptr});  // cannot happen within total
}

void BufferSource::segments(ByteRange range, std::vector<Segment>& out) const {
  out.clear();
  if (range.begin < base_ || range.end > base_ + size_)
    throw InternalError(fmt::format("checkpoint: range [{}, {}) outside the staged bytes [{}, {})", range.begin,
                                    range.end, base_, base_ + size_));
  if (range.size() > 0) out.push_back({range.begin, range.size(), data_ + (range.begin - base_)});
}

std::vector<LoadedTensor> tensors_in_range(const Manifest& manifest, ByteRange range, const uint8_t* base) {
  std::vector<LoadedTensor> out;
  for (const auto& t : manifest.tensors) {
    uint64_t b = std::max(t.offset, range.begin);
    uint64_t e = std::min(t.offset + t.bytes, range.end);
    // An empty tensor goes with the range holding its offset (the last range when it sits at
    // the very end), so that some reader of every partition sees it.
    bool inside = t.bytes == 0 ? t.offset >= range.begin &&
                                     (t.offset < range.end || (t.offset == range.end && range.end == manifest.total_bytes))
                               : b < e;
    if (!inside) continue;
    LoadedTensor lt;
    lt.info = t;
    lt.first_byte = t.bytes == 0 ? 0 : b - t.offset;
    lt.bytes = t.bytes == 0 ? std::span<const uint8_t>() : std::span<const uint8_t>(base + (b - range.begin), e - b);
    out.push_back(std::move(lt));
  }
  return out;
}

}  // namespace detail

BufferView LoadedTensor::view() const {
  if (!complete())
    throw InvalidArgumentError(fmt::format("tensor \"{}\": only bytes [{}, {}) of {} are loaded", info.name,
                                           first_byte, first_byte + bytes.size(), info.bytes));
  BufferView v;
  v.data = const_cast<uint8_t*>(bytes.data());
  v.dtype = info.dtype;
  v.count = info.bytes / dtype_size(info.dtype);
  return v;
}

const LoadedTensor* LoadedState::find(std::string_view name) const {
  for (const auto& t : tensors)
    if (t.info.name == name) return &t;
  return nullptr;
}

}  // namespace meshtrain::checkpoint
