#include "compress/payload.h"

namespace meshtrain::compress::detail {
namespace {

size_t ceil_div(uint64_t a, uint64_t b) { return static_cast<size_t>((a + b - 1) / b); }

}  // namespace

size_t payload_bytes(const Header& h) {
  if (h.count > kMaxCount)
    throw ProtocolError(fmt::format("{} payload header: count {} exceeds the limit {}",
                                    codec_name(h.codec), h.count, kMaxCount));
  auto params = [&](uint64_t a, uint64_t b, uint8_t max_flags) {
    if (h.param_a != a || h.param_b != b || h.flags > max_flags)
      throw ProtocolError(fmt::format(
          "{} payload header: params ({}, {}) flags {} (expected ({}, {}), flags <= {})",
          codec_name(h.codec), h.param_a, h.param_b, h.flags, a, b, max_flags));
  };
  const size_t n = static_cast<size_t>(h.count);
  switch (h.codec) {
    case CodecId::None:
      params(0, 0, 0);
      return kPayloadHeaderBytes + 4 * n;
    case CodecId::Fp16:
    case CodecId::Bf16:
      params(0, 0, 0);
      return kPayloadHeaderBytes + 2 * n;
    case CodecId::Int8: {
      if (h.param_a < 1 || h.param_a > kMaxInt8Block)
        throw ProtocolError(fmt::format("int8 payload header: block size {} (1 ..= {})",
                                        h.param_a, kMaxInt8Block));
      params(h.param_a, 0, 1);
      return kPayloadHeaderBytes + 4 * ceil_div(n, h.param_a) + n;
    }
    case CodecId::TopK: {
      if (h.count > UINT32_MAX)
        throw ProtocolError(fmt::format("topk payload header: count {} exceeds 2^32 - 1", h.count));
      if (h.param_a > h.count || (h.count > 0 && h.param_a == 0))
        throw ProtocolError(
            fmt::format("topk payload header: k = {} for {} elements", h.param_a, h.count));
      params(h.param_a, 0, 0);
      return kPayloadHeaderBytes + 8 * static_cast<size_t>(h.param_a);
    }
    case CodecId::PowerSgd: {
      if (h.flags == 1) {  // sent uncompressed (1-D, or low rank would not save bytes)
        params(h.param_a, 0, 1);
        return kPayloadHeaderBytes + 4 * n;
      }
      params(h.param_a, h.param_b, 1);
      const uint64_t rows = h.param_a, rank = h.param_b;
      if (rows == 0 || h.count % rows != 0)
        throw ProtocolError(fmt::format("powersgd payload header: {} rows do not divide {} elements",
                                        rows, h.count));
      const uint64_t cols = h.count / rows;
      if (rank < 1 || rank > kMaxPowerSgdRank || rank > rows || rank > cols)
        throw ProtocolError(fmt::format(
            "powersgd payload header: rank {} for a {}x{} matrix (1 ..= min(rows, cols, {}))", rank,
            rows, cols, kMaxPowerSgdRank));
      return kPayloadHeaderBytes + 4 * static_cast<size_t>(rank * (rows + cols));
    }
  }
  throw ProtocolError(fmt::format("payload header: unknown codec id {}", static_cast<int>(h.codec)));
}

void write_header(std::span<uint8_t> out, const Header& h) {
  uint8_t* p = out.data();
  store<uint32_t>(p, 0, kMagic);
  p[4] = static_cast<uint8_t>(h.codec);
  p[5] = kVersion;
  p[6] = h.flags;
  p[7] = 0;
  store<uint64_t>(p, 1, h.count);
  store<uint64_t>(p, 2, h.param_a);
  store<uint64_t>(p, 3, h.param_b);
}

Header read_header(std::span<const uint8_t> payload) {
  if (payload.size() < kPayloadHeaderBytes)
    throw ProtocolError(fmt::format("payload of {} bytes is shorter than its {}-byte header",
                                    payload.size(), kPayloadHeaderBytes));
  const uint8_t* p = payload.data();
  uint32_t magic = load<uint32_t>(p, 0);
  if (magic != kMagic)
    throw ProtocolError(fmt::format("payload magic {:#010x} is not {:#010x} (\"MTC1\")", magic, kMagic));
  if (p[4] > static_cast<uint8_t>(CodecId::PowerSgd))
    throw ProtocolError(fmt::format("payload header: unknown codec id {}", p[4]));
  Header h;
  h.codec = static_cast<CodecId>(p[4]);
  if (p[5] != kVersion)
    throw ProtocolError(fmt::format("{} payload version {} (this build reads version {})",
                                    codec_name(h.codec), p[5], kVersion));
  if (p[7] != 0)
    throw ProtocolError(fmt::format("{} payload header: reserved byte is {}", codec_name(h.codec), p[7]));
  h.flags = p[6];
  h.count = load<uint64_t>(p, 1);
  h.param_a = load<uint64_t>(p, 2);
  h.param_b = load<uint64_t>(p, 3);
  size_t expected = payload_bytes(h);
  if (payload.size() != expected)
    throw ProtocolError(fmt::format("{} payload of {} elements is {} bytes; its header implies {}",
                                    codec_name(h.codec), h.count, payload.size(), expected));
  return h;
}

Header read_header_for(std::span<const uint8_t> payload, CodecId expected, size_t count) {
  Header h = read_header(payload);
  if (h.codec != expected)
    throw ProtocolError(fmt::format("{} decoder given a {} payload", codec_name(expected),
                                    codec_name(h.codec)));
  if (h.count != count)
    throw ProtocolError(fmt::format("{} payload holds {} elements; the output buffer has {}",
                                    codec_name(expected), h.count, count));
  return h;
}

}  // namespace meshtrain::compress::detail

namespace meshtrain::compress {

PayloadInfo inspect_payload(std::span<const uint8_t> payload) {
  detail::Header h = detail::read_header(payload);
  return PayloadInfo{h.codec, detail::kVersion, h.flags, static_cast<size_t>(h.count),
                     h.param_a, h.param_b, payload.size()};
}

}  // namespace meshtrain::compress
