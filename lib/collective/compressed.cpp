// The compressed all-reduce (docs/compression.md, "The compressed all-reduce"): encode once per
// attempt, send the encoded chunks to their owners (directly over a mesh, or relayed along the
// ring), owner decode_accumulates in rank order in fp32 and re-encodes, all-gather of the
// owners' payloads, everyone decodes the same bytes.
// Top-k can instead all-gather every member's whole-tensor payload.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "collective/device.h"
#include "collective/exchange.h"
#include "collective/ring.h"
#include "collective/step_attempt.h"
#include "meshtrain/collective.h"

namespace meshtrain::collective {
namespace {

using compress::Codec;
using compress::CodecState;

size_t chunk_begin(size_t count, size_t chunks, size_t c) { return count * c / chunks; }
size_t chunk_size(size_t count, size_t chunks, size_t c) {
  return chunk_begin(count, chunks, c + 1) - chunk_begin(count, chunks, c);
}
// Chunk c of `chunks` of an fp32 buffer: its view, and the spec of a codec state for it.
BufferView chunk_of(const BufferView& buffer, size_t chunks, size_t c) {
  BufferView chunk = buffer;
  chunk.data = static_cast<float*>(buffer.data) + chunk_begin(buffer.count, chunks, c);
  chunk.count = chunk_size(buffer.count, chunks, c);
  return chunk;
}
compress::TensorSpec chunk_spec(size_t count, size_t chunks, size_t c, const BufferView& device) {
  return compress::TensorSpec::flat(chunk_size(count, chunks, c), device.device, device.device_index);
}
std::string device_name(const BufferView& b) {
  return b.device == DeviceKind::Cuda ? fmt::format("cuda:{}", b.device_index) : std::string("the CPU");
}

// A member's error feedback for one partition of the buffer into `chunks` chunks.
struct MemberSide {
  size_t chunks = 0;  // 0: nothing encoded yet
  std::vector<std::unique_ptr<CodecState>> states;
  std::vector<float> carry;  // the residual of an earlier partition, added to the next gradient

  MemberSide copy() const {
    MemberSide m;
    m.chunks = chunks;
    for (const auto& s : states) m.states.push_back(s->clone());
    m.carry = carry;
    return m;
  }
  // The whole-buffer residual (empty when there is none).
  std::vector<float> residual(size_t count) const {
    std::vector<float> out;
    for (const auto& s : states) {
      std::vector<float> r = s->residual();
      out.insert(out.end(), r.begin(), r.end());
    }
    if (out.size() != count) out.clear();  // codec without error feedback
    if (!carry.empty()) {
      if (out.empty()) out.assign(count, 0.0f);
      for (size_t i = 0; i < count; ++i) out[i] += carry[i];
    }
    return out;
  }
  // The same error feedback over `n` chunks: fresh states on `device`'s device, the old
  // residual carried.
  MemberSide repartitioned(const Codec& codec, size_t count, size_t n, const BufferView& device) const {
    if (chunks == n) return copy();
    MemberSide m;
    m.chunks = n;
    m.carry = residual(count);
    for (size_t c = 0; c < n; ++c) m.states.push_back(codec.make_state(chunk_spec(count, n, c, device)));
    return m;
  }
};

// The owner's re-encode state of chunk `rank` of `chunks`.
struct OwnerSide {
  size_t chunks = 0;
  uint32_t rank = 0;
  std::unique_ptr<CodecState> state;
};

bool is_codec_error(const Error& e) {
  return e.code() == ErrorCode::Protocol || e.code() == ErrorCode::Corrupt;
}

}  // namespace

struct CompressedState::Impl {
  CompressedOptions options;
  std::string codec_config;  // describe() of the codec it is bound to; empty before first use
  size_t count = 0;
  std::string device;  // where the bound buffer lives, and the member states' residuals
  MemberSide member;
  OwnerSide owner;
  CompressedTraffic traffic;
  // Changes of the running attempt; they replace the above in commit(). A kept partition or
  // ownership encodes with its committed states staged (compress.h, CodecState::stage: the
  // result is pending inside the state, nothing is copied) instead of a pending copy.
  std::optional<MemberSide> pending_member;
  std::optional<OwnerSide> pending_owner;
  bool member_staged = false;
  bool owner_staged = false;
  CompressedTraffic pending_traffic;
  // Host memory of the operations, kept from one to the next (ReusedBytes): the member's
  // payloads, the owners' payloads, the fp32 sum on the host (the owner's chunk; the whole
  // buffer where a CUDA buffer is summed on the host), the exchange's received blocks. Released
  // when the layout changes (quorum size, or top-k's path), so that what stays allocated is
  // the current layout's, not the largest one seen. For a CUDA buffer, what is copied to or
  // from the device is pinned (`memory`).
  std::vector<ReusedBytes> payload_space;
  ReusedBytes owners_space, sum_space;
  ReceiveSpace received_space;
  HostMemory memory = HostMemory::Pageable;
  int device_index = 0;  // the bound buffer's CUDA device
  // PowerSGD does not stage: an attempt works on a copy of the member's state. The state the
  // last commit replaced (or a discarded attempt's copy) is kept to copy into next time
  // (powersgd_copy_state): no allocation per step, and, for a CUDA state, no cudaFree (which
  // synchronises the whole device) at commit.
  std::unique_ptr<CodecState> powersgd_spare;
  void keep_powersgd_spare(MemberSide& side) {
    if (side.states.size() == 1 && side.states[0] && side.states[0]->codec() == compress::CodecId::PowerSgd)
      powersgd_spare = std::move(side.states[0]);
  }
  std::pair<size_t, bool> space_layout{0, false};  // (quorum size, top-k all-gather)
  void fit_space(size_t members, bool all_gather) {
    if (space_layout == std::pair{members, all_gather}) return;
    payload_space.clear();
    owners_space = ReusedBytes{};
    sum_space = ReusedBytes{};
    received_space = ReceiveSpace{{}, memory, device_index};
    space_layout = {members, all_gather};
  }

  void bind(const Codec& codec, const BufferView& buffer, bool pin) {
    std::string config = codec.describe();
    std::string where = device_name(buffer);
    if (codec_config.empty()) {
      codec_config = config;
      count = buffer.count;
      device = where;
      memory = received_space.memory = device::host_memory_for(buffer, pin);
      device_index = received_space.device = buffer.device_index;
    } else if (codec_config != config || count != buffer.count || device != where) {
      throw InvalidArgumentError(fmt::format("CompressedState is bound to {} over {} elements on {}; used with {} over "
                                             "{} on {}",
                                             codec_config, count, device, config, buffer.count, where));
    }
  }
  void commit() {
    if (member_staged)
      for (auto& s : member.states) s->commit_staged();
    if (owner_staged) owner.state->commit_staged();
    member_staged = owner_staged = false;
    if (pending_member) {
      keep_powersgd_spare(member);
      member = std::move(*pending_member);
    }
    if (pending_owner) owner = std::move(*pending_owner);
    traffic = pending_traffic;
    discard();
  }
  void discard() {
    if (member_staged)
      for (auto& s : member.states) s->discard_staged();
    if (owner_staged) owner.state->discard_staged();
    member_staged = owner_staged = false;
    if (pending_member) keep_powersgd_spare(*pending_member);
    pending_member.reset();
    pending_owner.reset();
  }
};

CompressedState::CompressedState(CompressedOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
}
CompressedState::~CompressedState() = default;
CompressedState::CompressedState(CompressedState&&) noexcept = default;
CompressedState& CompressedState::operator=(CompressedState&&) noexcept = default;
const CompressedOptions& CompressedState::options() const { return impl_->options; }
std::vector<float> CompressedState::member_residual() const { return impl_->member.residual(impl_->count); }
std::vector<float> CompressedState::owner_residual() const {
  return impl_->owner.state ? impl_->owner.state->residual() : std::vector<float>{};
}
const CompressedTraffic& CompressedState::traffic() const { return impl_->traffic; }
void CompressedState::reset() {
  impl_->member = MemberSide{};
  impl_->owner = OwnerSide{};
  impl_->discard();
  impl_->powersgd_spare.reset();
}

namespace {

// A contributor's gradient with a NaN or Inf is refused before anything is sent.
void refuse_non_finite(const BufferView& buffer, compress::CudaStream stream) {
  if (size_t i = device::find_nonfinite(buffer, stream); i != buffer.count)
    throw InvalidArgumentError(fmt::format("gradient element {} of {} is {}; nothing was sent", i, buffer.count,
                                           device::element(buffer, i, stream)));
}

// Encodes chunk c of `chunks` of `source` with `state` into `out`, sized by encoded_bytes;
// checks the exact size the frames are cut to.
void encode_chunk(const Codec& codec, const BufferView& source, size_t chunks, size_t c, CodecState& state,
                  std::span<uint8_t> out, compress::CudaStream stream) {
  const BufferView chunk = chunk_of(source, chunks, c);
  if (out.size() != codec.encoded_bytes(chunk.count))
    throw InternalError(fmt::format("{}: a payload buffer of {} bytes for chunk {} of {} elements (encoded_bytes: {})",
                                    codec.describe(), out.size(), c, chunk.count, codec.encoded_bytes(chunk.count)));
  size_t written = codec.encode(chunk, state, out, stream);
  if (written != out.size())
    throw InternalError(fmt::format("{} wrote {} bytes where encoded_bytes said {}; the compressed all-reduce needs "
                                    "exact sizes", codec.describe(), written, out.size()));
}

// Runs a decode of `member`'s payload; a payload the codec rejects fails the operation naming
// the member (reported like a lost peer, so the coordinator's Abort names it too).
template <typename F>
void decode_from(const coord::Member& member, std::string_view what, F&& decode) {
  try {
    decode();
  } catch (const Error& e) {
    if (!is_codec_error(e)) throw;
    const std::string who = member.id.fingerprint();
    throw PeerLostError(who, fmt::format("peer {} (rank {}) sent a bad {} payload: {}", who, member.rank, what,
                                         e.what()));
  }
}

}  // namespace

void Communicator::allreduce_compressed(BufferView buffer, const compress::Codec& codec, CompressedState& state,
                                        ReduceOp op) {
  compressed_attempt(buffer, codec, state, op);
  state.impl_->commit();
}

void Communicator::compressed_attempt(BufferView buffer, const compress::Codec& codec, CompressedState& state,
                                      ReduceOp op) {
  if (buffer.dtype != DType::Float32)
    throw InvalidArgumentError(fmt::format("allreduce_compressed: needs a float32 buffer, got {} on {}",
                                           dtype_name(buffer.dtype), device_name(buffer)));
  device::require_supported("allreduce_compressed", buffer);
  const compress::CudaStream stream = options().cuda_stream;
  CompressedState::Impl& st = *state.impl_;
  st.discard();
  st.bind(codec, buffer, options().pinned_staging);
  const coord::Quorum& q = quorum();
  const size_t n = q.members.size();
  const uint32_t r = rank();
  const size_t count = buffer.count;
  const bool contributes = q.member(id()).contributes;
  const float divisor = op == ReduceOp::Avg ? static_cast<float>(std::max<size_t>(q.contributors(), 1)) : 1.0f;
  if (codec.id() == compress::CodecId::PowerSgd) {  // checks the gradient itself
    powersgd_attempt(buffer, codec, state, op);
    return;
  }
  if (contributes) refuse_non_finite(buffer, stream);

  // Top-k: all-gather the whole-tensor payloads where that moves no more bytes than the owner
  // path (n-1 chunk payloads sent directly, or about n(n-1)/2 relayed, plus the owners'
  // all-gather of n-1).
  const bool direct = st.options.exchange == Exchange::Direct;
  bool all_gather = false;
  if (codec.id() == compress::CodecId::TopK) {
    const double whole = static_cast<double>(codec.encoded_bytes(count));
    const double chunk = static_cast<double>(codec.encoded_bytes(chunk_size(count, n, 0)));
    const double owner_path = direct ? 2.0 * (n - 1) * chunk : (n - 1) * chunk * (n / 2.0 + 1.0);
    switch (st.options.sparse_gather) {
      case SparseGather::AllGather: all_gather = true; break;
      case SparseGather::Owner: all_gather = false; break;
      case SparseGather::Auto: all_gather = (n - 1) * whole <= owner_path; break;
    }
  }
  const size_t chunks = all_gather ? 1 : n;

  try {
    // Member side: encode this attempt's payloads from the committed states, staged, or from
    // fresh states for a new partition.
    std::vector<std::unique_ptr<CodecState>>* states = nullptr;
    std::vector<std::unique_ptr<CodecState>> scratch;
    std::optional<device::Floats> work;  // the gradient plus a carried residual, or a joiner's zeros
    BufferView source = buffer;
    if (contributes && st.member.chunks == chunks && st.member.carry.empty()) {
      for (auto& s : st.member.states) s->stage();
      st.member_staged = true;
      states = &st.member.states;
    } else if (contributes) {
      st.pending_member = st.member.repartitioned(codec, count, chunks, buffer);
      MemberSide& m = *st.pending_member;
      if (!m.carry.empty()) {  // rare (the quorum size changed): summed on the host
        std::vector<float> sum(count);
        device::copy_to_host(buffer, sum.data(), stream);
        for (size_t i = 0; i < count; ++i) sum[i] += m.carry[i];
        work.emplace(sum, buffer, stream);
        source = work->view();
        m.carry.clear();
      }
      states = &m.states;
    } else {
      // A joiner adds an encoded zero and keeps no residual.
      work.emplace(count, buffer);
      source = work->view();
      for (size_t c = 0; c < chunks; ++c) scratch.push_back(codec.make_state(chunk_spec(count, chunks, c, buffer)));
      states = &scratch;
    }
    st.fit_space(n, all_gather);
    st.payload_space.resize(chunks);
    std::vector<std::span<uint8_t>> payloads(chunks);
    for (size_t c = 0; c < chunks; ++c)
      payloads[c] =
          st.payload_space[c].take(codec.encoded_bytes(chunk_size(count, chunks, c)), st.memory, st.device_index);
    auto encode_payload = [&](size_t c) {
      encode_chunk(codec, source, chunks, c, *(*states)[c], payloads[c], stream);
      if (st.options.payload_hook) st.options.payload_hook(all_gather ? r : static_cast<uint32_t>(c), payloads[c]);
    };
    // The direct exchange encodes each owner's chunk just before sending it (overlapped with
    // the sends before it); the other paths encode everything first.
    const bool encode_while_sending = direct && !all_gather;
    if (!encode_while_sending)
      for (size_t c = 0; c < chunks; ++c) encode_payload(c);

    CompressedTraffic traffic;
    traffic.gradient_bytes = count * sizeof(float);
    traffic.sparse_all_gather = all_gather;
    if (all_gather) {
      const size_t block = payloads[0].size();
      const std::span<uint8_t> everyone = st.owners_space.take(n * block);  // decoded on the host
      std::memcpy(everyone.data() + r * block, payloads[0].data(), block);
      run_ring_op("allreduce_compressed", [&](RingContext& ctx) {
        ctx.reject_non_finite = false;  // payload bytes, not floats: the decoders check them
        ring_allgather_blocks(ctx, everyone.data(), block);
        // Summed on the host (sparse payloads: cheap), then copied to a CUDA buffer.
        device::HostView host(buffer, stream, st.sum_space, st.memory, /*load=*/false);
        float* sum = static_cast<float*>(host.view().data);
        std::fill(sum, sum + count, 0.0f);
        for (size_t j = 0; j < n; ++j)
          decode_from(q.members[j], codec.name(), [&] {
            codec.decode_accumulate(std::span<const uint8_t>(everyone.data() + j * block, block), host.view());
          });
        if (divisor != 1.0f)
          for (size_t i = 0; i < count; ++i) sum[i] /= divisor;
        host.write_back();
      });
      traffic.sent_bytes = traffic.received_bytes = (n - 1) * block;
    } else {
      // Owner side, on the host whatever the buffer's device (so that CPU and CUDA members
      // reduce alike): the re-encode state of chunk r, staged, or fresh when ownership moved.
      std::unique_ptr<CodecState>* owner_state;
      if (st.owner.state && st.owner.chunks == n && st.owner.rank == r) {
        st.owner.state->stage();
        st.owner_staged = true;
        owner_state = &st.owner.state;
      } else {
        st.pending_owner = OwnerSide{n, r, codec.make_state(compress::TensorSpec::flat(chunk_size(count, n, r)))};
        owner_state = &st.pending_owner->state;
      }
      std::vector<size_t> sizes(n);
      size_t block = 0;
      for (size_t c = 0; c < n; ++c) block = std::max(block, sizes[c] = payloads[c].size());
      std::vector<std::span<const uint8_t>> blocks(payloads.begin(), payloads.end());
      // Chunk c's payload at c * block; the direct exchange keeps only this owner's block.
      const std::span<uint8_t> owners = st.owners_space.take(direct ? block : n * block, st.memory, st.device_index);
      const size_t own_at = direct ? 0 : r * block;
      const size_t own = chunk_size(count, n, r);
      const std::span<float> sum = st.sum_space.take_floats(own);
      std::fill(sum.begin(), sum.end(), 0.0f);
      BufferView sum_view{sum.data(), own, DType::Float32};
      // Rank order, whichever way the payloads came: the same sum on any rerun.
      auto accumulate = [&](size_t j, std::span<const uint8_t> payload) {
        decode_from(q.members[j], fmt::format("{} chunk {}", codec.name(), r),
                    [&] { codec.decode_accumulate(payload, sum_view); });
      };
      auto reencode = [&] {
        if (divisor != 1.0f)
          for (float& x : sum) x /= divisor;
        // Straight into this owner's block; the padding after it (the chunks' payloads differ by
        // a few bytes at most) is sent too, so it is zeroed rather than left from earlier data.
        encode_chunk(codec, sum_view, 1, 0, **owner_state, owners.subspan(own_at, sizes[r]), stream);
        std::fill(owners.begin() + static_cast<std::ptrdiff_t>(own_at + sizes[r]),
                  owners.begin() + static_cast<std::ptrdiff_t>(own_at + block), uint8_t{0});
      };
      auto decode_owner = [&](size_t c, std::span<const uint8_t> payload) {
        decode_from(q.members[c], fmt::format("reduced {} chunk {}", codec.name(), c), [&] {
          codec.decode(payload.first(sizes[c]), chunk_of(buffer, n, c), stream);
        });
      };
      auto reduce_and_gather = [&](RingContext& ctx) {
        reencode();
        ring_allgather_blocks(ctx, owners.data(), block);
        for (size_t c = 0; c < n; ++c) decode_owner(c, std::span<const uint8_t>(owners.data() + c * block, block));
      };
      if (direct) {
        run_mesh_op("allreduce_compressed", [&](RingContext& ctx, const MeshLinks& links) {
          ctx.reject_non_finite = false;  // payload bytes, not floats: the decoders check them
          exchange_to_owners(ctx, links, blocks, accumulate, st.received_space, encode_payload);
          // The owners' payloads go straight to everyone too (the same (n-1) x block bytes as
          // the ring's all-gather), each decoded as it arrives.
          reencode();
          const std::vector<std::span<const uint8_t>> reduced(n, std::span<const uint8_t>(owners.data() + own_at, block));
          exchange_to_owners(ctx, links, reduced, decode_owner, st.received_space, {}, ExchangePhase::AllGather);
        });
        for (size_t c = 0; c < n; ++c)
          if (c != r) traffic.sent_bytes += sizes[c];
        traffic.received_bytes += (n - 1) * sizes[r];
      } else {
        run_ring_op("allreduce_compressed", [&](RingContext& ctx) {
          ctx.reject_non_finite = false;
          std::vector<std::vector<uint8_t>> gathered;
          ring_gather_to_owners(ctx, blocks, gathered);
          for (size_t j = 0; j < n; ++j) accumulate(j, gathered[j]);
          reduce_and_gather(ctx);
        });
        for (size_t k = 0; k + 1 < n; ++k) {
          traffic.sent_bytes += (k + 1) * sizes[(r + 2 * n - k - 1) % n];
          traffic.received_bytes += (k + 1) * sizes[(r + 2 * n - k - 2) % n];
        }
      }
      traffic.sent_bytes += (n - 1) * block;
      traffic.received_bytes += (n - 1) * block;
    }
    st.pending_traffic = traffic;
  } catch (...) {
    st.discard();
    throw;
  }
}

// PowerSGD by linearity: p = sum of M_i Q, orthonormalised; q = average of M_i^T p; out = p q^T
// (compress.h, powersgd_project). Two plain ring all-reduces; no owner, no chunks. Each
// member's residual is M_i minus the average's approximation (Vogels et al.), also for Sum,
// which then scales the output by the number of contributors.
void Communicator::powersgd_attempt(BufferView buffer, const compress::Codec& codec, CompressedState& state,
                                    ReduceOp op) {
  CompressedState::Impl& st = *state.impl_;
  const size_t count = buffer.count, n = quorum().members.size();
  const float contributors = static_cast<float>(std::max<size_t>(quorum().contributors(), 1));
  const float divisor = op == ReduceOp::Avg ? contributors : 1.0f;
  const bool contributes = quorum().member(id()).contributes;
  const compress::CudaStream stream = options().cuda_stream;
  // The states live on the buffer's device, where the products run; only p and q (rows x r and
  // cols x r) are all-reduced, over host memory.
  compress::TensorSpec spec{st.options.shape.empty() ? std::vector<size_t>{count} : st.options.shape,
                            buffer.device, buffer.device_index};
  if (spec.count() != count)
    throw InvalidArgumentError(fmt::format("allreduce_compressed: CompressedOptions::shape holds {} elements, the "
                                           "buffer {}", spec.count(), count));
  auto ring_bytes = [n](size_t bytes) { return static_cast<uint64_t>(bytes * 2 * (n - 1) / n); };
  // PowerSGD's all-reduces (P, Q, or a tensor sent uncompressed) sum floats: a NaN/Inf from a
  // peer would reach every member's output, residual and warm start for good, so it is refused
  // naming the sender, as the codecs' decoders refuse theirs, also outside reduce_step.
  auto sum_floats = [&](const char* what, float* data, size_t values, float by) {
    run_ring_op(what, [&](RingContext& ctx) {
      ctx.reject_non_finite = true;
      ring_allreduce(ctx, data, values, by);
    });
  };
  try {
    // A joiner adds zeros through a scratch state; its own keeps its residual and takes the
    // step's q as its next warm start (powersgd_adopt_q), like the contributors' states.
    auto own_state = [&]() -> std::unique_ptr<compress::CodecState> {
      if (st.member.states.empty()) return codec.make_state(spec);
      if (!st.powersgd_spare) return st.member.states[0]->clone();
      std::unique_ptr<compress::CodecState> copy = std::move(st.powersgd_spare);
      compress::powersgd_copy_state(*st.member.states[0], *copy, stream);
      return copy;
    };
    // Pending from the start, so that a failed attempt's copy becomes the spare (discard()).
    MemberSide& m = st.pending_member.emplace();
    m.chunks = 1;
    m.states.push_back(contributes ? own_state() : codec.make_state(spec));
    compress::CodecState& s = *m.states[0];
    const compress::LowRankShape shape = compress::powersgd_shape(s);
    CompressedTraffic traffic;
    traffic.gradient_bytes = count * sizeof(float);
    if (shape.rank == 0) {  // sent uncompressed: a plain all-reduce (over host memory)
      // (The compressed way, powersgd_project refuses NaN/Inf before anything is sent.)
      if (contributes) refuse_non_finite(buffer, stream);
      device::HostView host(buffer, stream, st.sum_space, st.memory, contributes);
      float* data = static_cast<float*>(host.view().data);
      if (!contributes) std::fill(data, data + count, 0.0f);
      sum_floats("allreduce_compressed", data, count, divisor);
      host.write_back();
      traffic.sent_bytes = traffic.received_bytes = ring_bytes(count * sizeof(float));
    } else {
      std::optional<device::Floats> zeros;
      BufferView grad = buffer;
      if (!contributes) {
        zeros.emplace(count, buffer);
        grad = zeros->view();
      }
      std::vector<float> p(shape.rows * shape.rank), q(shape.cols * shape.rank);
      compress::powersgd_project(grad, s, p, stream);
      sum_floats("allreduce_compressed (powersgd P)", p.data(), p.size(), 1.0f);
      compress::powersgd_back_project(s, p, q, stream);
      sum_floats("allreduce_compressed (powersgd Q)", q.data(), q.size(), contributors);
      compress::powersgd_finish(s, p, q, buffer, stream);
      if (op == ReduceOp::Sum) device::scale(buffer, contributors, stream);
      traffic.sent_bytes = traffic.received_bytes = ring_bytes((p.size() + q.size()) * sizeof(float));
      if (!contributes) {
        MemberSide kept;
        kept.chunks = 1;
        kept.states.push_back(own_state());
        compress::powersgd_adopt_q(*kept.states[0], q);
        st.pending_member = std::move(kept);
      }
    }
    if (!contributes && shape.rank == 0) st.pending_member.reset();  // its own state did not take part
    st.pending_traffic = traffic;
  } catch (...) {
    st.discard();
    throw;
  }
}

StepResult Communicator::reduce_step(uint64_t step, BufferView gradients, const compress::Codec& codec,
                                     CompressedState& state, uint32_t max_attempts) {
  device::require_supported("reduce_step", gradients);
  struct CompressedAttempt final : StepAttempt {
    Communicator& comm;
    BufferView gradients;
    const compress::Codec& codec;
    CompressedState& state;
    CompressedAttempt(Communicator& c, BufferView g, const compress::Codec& k, CompressedState& s)
        : comm(c), gradients(g), codec(k), state(s) {}
    void run() override { comm.compressed_attempt(gradients, codec, state, ReduceOp::Avg); }
    void rollback() override { state.impl_->discard(); }
    void commit() override { state.impl_->commit(); }
  } attempt(*this, gradients, codec, state);
  return run_step(step, gradients, attempt, max_attempts);
}

}  // namespace meshtrain::collective
