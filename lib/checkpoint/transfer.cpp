// Live state transfer over a net::BulkChannel:
//
//   sender                               receiver
//   Offer(step, total, manifest bytes) ->
//                                     <- Answer(ok | too large | bad version)
//   Manifest(JSON)                     ->
//   Block 0 .. Block n-1               ->   each verified against the manifest (hash thread)
//                                     <- Verdict(ok | bad manifest | bad block k)
//
// The receiver reads every block even after a failed check (into scratch), so that both sides
// end the exchange in step and the sender learns which block failed.
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "checkpoint/internal.h"
#include "checkpoint/transfer.h"
#include "meshtrain/net.h"

namespace meshtrain::checkpoint {

using namespace detail;

namespace {

std::string peer_name(net::BulkChannel& channel) { return channel.peer().fingerprint(); }

void send_small(net::BulkChannel& channel, uint16_t type, uint32_t tag, uint64_t op_seq, uint64_t step,
                Deadline deadline, const CancelToken* cancel) {
  net::MessageHeader h;
  h.type = type;
  h.tag = tag;
  h.op_seq = op_seq;
  h.step = step;
  channel.send(h, {}, deadline, cancel);
}

net::MessageHeader expect(net::BulkChannel& channel, uint16_t type, std::span<uint8_t> dest, Deadline deadline,
                          const CancelToken* cancel, std::string_view what) {
  net::MessageHeader h = channel.recv_into(dest, deadline, cancel);
  if (h.type != type)
    throw ProtocolError(fmt::format("state transfer: peer {} sent message type {} where {} ({}) was expected",
                                    peer_name(channel), h.type, what, type));
  return h;
}

std::string verdict_text(uint32_t tag, uint64_t op_seq) {
  switch (tag) {
    case transfer::kTooLarge: return "the state is over its size limits";
    case transfer::kBadVersion: return "it does not support this format version";
    case transfer::kBadManifest: return "the manifest is malformed";
    case transfer::kBadBlock: return fmt::format("block {} failed its SHA-256 check", op_seq);
    default: return fmt::format("verdict {}", tag);
  }
}

}  // namespace

Manifest send_state(net::BulkChannel& channel, const State& state, const TransferOptions& o) {
  check_block_bytes(o.block_bytes);
  Layout layout = make_layout(state);
  check_metadata(state.metadata, state.blobs, o.limits);
  StateSource source(layout, state);
  const ByteRange all{0, layout.total_bytes};
  const Deadline deadline = Deadline::after(o.timeout);
  const std::string peer = peer_name(channel);
  const auto start = Clock::now();

  Manifest m;
  m.step = state.step;
  uint8_t id[8];
  crypto::random_bytes(id);
  m.save_id = "transfer-" + crypto::to_hex(id);
  m.world_size = 1;
  m.total_bytes = layout.total_bytes;
  m.block_bytes = o.block_bytes;
  m.created_unix_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  m.tensors = layout.tensors;
  m.metadata = state.metadata;
  m.blobs = state.blobs;
  ShardInfo shard;
  shard.rank = 0;
  shard.file = shard_file_name(0, 1);
  shard.range = all;
  shard.block_sha256 = hash_blocks(source, all, o.block_bytes, o.hash_threads);
  shard.sha256 = digest_of_blocks(shard.block_sha256);
  m.shards.push_back(std::move(shard));
  std::string json = manifest_to_json(m);

  net::MessageHeader offer;
  offer.type = transfer::kOffer;
  offer.step = m.step;
  offer.quorum_id = m.total_bytes;
  offer.op_seq = json.size();
  offer.tag = kFormatVersion;
  channel.send(offer, {}, deadline, o.cancel);
  net::MessageHeader answer = expect(channel, transfer::kAnswer, {}, deadline, o.cancel, "an answer to the state offer");
  if (answer.tag != transfer::kOk)
    throw ProtocolError(fmt::format("state transfer: peer {} refused the state of step {} ({}): {}", peer, m.step,
                                    format_bytes(m.total_bytes), verdict_text(answer.tag, answer.op_seq)));

  net::MessageHeader h;
  h.type = transfer::kManifest;
  h.step = m.step;
  channel.send(h, {reinterpret_cast<const uint8_t*>(json.data()), json.size()}, deadline, o.cancel);

  const uint64_t B = o.block_bytes;
  const uint64_t nblocks = m.shards[0].block_sha256.size();
  HostBuffer staging;
  std::vector<Segment> segments;
  for (uint64_t k = 0; k < nblocks; ++k) {
    ByteRange b{k * B, std::min((k + 1) * B, all.end)};
    source.segments(b, segments);
    crypto::ByteSpan payload;
    if (segments.size() == 1 && segments[0].data) {
      payload = {segments[0].data, static_cast<size_t>(b.size())};
    } else {  // several tensors or padding: gather
      if (staging.size() < B) staging = HostBuffer(B);
      for (const auto& s : segments) {
        uint8_t* dst = staging.data() + (s.offset - b.begin);
        if (s.data) std::memcpy(dst, s.data, s.length);
        else std::memset(dst, 0, s.length);
      }
      payload = {staging.data(), static_cast<size_t>(b.size())};
    }
    net::MessageHeader bh;
    bh.type = transfer::kBlock;
    bh.step = m.step;
    bh.op_seq = k;
    channel.send(bh, payload, deadline, o.cancel);
    if (o.after_block) o.after_block(k + 1, nblocks);
  }
  net::MessageHeader verdict = expect(channel, transfer::kVerdict, {}, deadline, o.cancel, "the receiver's verdict");
  if (verdict.tag != transfer::kOk)
    throw CorruptError(fmt::format("state transfer: peer {} rejected the state of step {}: {}", peer, m.step,
                                   verdict_text(verdict.tag, verdict.op_seq)));
  double s = std::chrono::duration<double>(Clock::now() - start).count();
  log::info("checkpoint", "sent the state of step {} ({}) to peer {} in {:.2f} s", m.step, format_bytes(m.total_bytes),
            peer, s);
  return m;
}

LoadedState receive_state(net::BulkChannel& channel, const TransferOptions& o) {
  const Deadline deadline = Deadline::after(o.timeout);
  const std::string peer = peer_name(channel);
  const auto start = Clock::now();

  net::MessageHeader offer = expect(channel, transfer::kOffer, {}, deadline, o.cancel, "a state offer");
  const uint64_t total = offer.quorum_id;
  const uint64_t manifest_bytes = offer.op_seq;
  if (offer.tag != kFormatVersion) {
    send_small(channel, transfer::kAnswer, transfer::kBadVersion, 0, offer.step, deadline, o.cancel);
    throw ProtocolError(fmt::format("state transfer: peer {} offers format version {}, this side reads {}", peer,
                                    offer.tag, kFormatVersion));
  }
  uint64_t max_total = std::min<uint64_t>(o.max_state_bytes, o.limits.max_total_bytes);
  if (total > max_total || manifest_bytes > o.limits.max_manifest_bytes) {
    send_small(channel, transfer::kAnswer, transfer::kTooLarge, 0, offer.step, deadline, o.cancel);
    throw ProtocolError(fmt::format(
        "state transfer: peer {} offers a state of {} bytes with a {}-byte manifest; the limits are {} and {} bytes",
        peer, total, manifest_bytes, max_total, o.limits.max_manifest_bytes));
  }
  send_small(channel, transfer::kAnswer, transfer::kOk, 0, offer.step, deadline, o.cancel);

  std::string json(manifest_bytes, '\0');
  expect(channel, transfer::kManifest, {reinterpret_cast<uint8_t*>(json.data()), json.size()}, deadline, o.cancel,
         "the state manifest");
  LoadedState st;
  try {
    st.manifest = parse_manifest(json, fmt::format("state manifest from peer {}", peer), o.limits);
    if (st.manifest.total_bytes != total || st.manifest.step != offer.step)
      throw CorruptError(fmt::format("state manifest from peer {}: step {} / {} bytes, the offer said step {} / {} bytes",
                                     peer, st.manifest.step, st.manifest.total_bytes, offer.step, total));
  } catch (const CorruptError&) {
    send_small(channel, transfer::kVerdict, transfer::kBadManifest, 0, offer.step, deadline, o.cancel);
    throw;
  }
  const Manifest& m = st.manifest;
  st.range = {0, total};
  st.buffer = HostBuffer(total);

  // Blocks arrive in order; a hash thread checks each one while the next is received.
  struct Pending {
    const ShardInfo* shard;
    uint64_t block;
    uint64_t index;
    const uint8_t* data;
    size_t size;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Pending> queue;
  bool closed = false;
  std::optional<std::pair<const ShardInfo*, uint64_t>> bad;  // first failed block
  uint64_t bad_index = 0;
  std::thread hasher([&] {
    while (true) {
      Pending p;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return closed || !queue.empty(); });
        if (queue.empty()) return;
        p = queue.front();
        queue.pop_front();
        if (bad) continue;
      }
      if (p.data && crypto::sha256({p.data, p.size}) != p.shard->block_sha256[p.block]) {
        std::lock_guard<std::mutex> lock(mu);
        if (!bad) {
          bad.emplace(p.shard, p.block);
          bad_index = p.index;
        }
      }
    }
  });
  auto stop_hasher = [&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      closed = true;
    }
    cv.notify_all();
    hasher.join();
  };

  const uint64_t B = m.block_bytes;
  HostBuffer scratch;
  uint64_t index = 0;
  uint64_t total_blocks = 0;
  for (const auto& s : m.shards) total_blocks += s.block_sha256.size();
  try {
    for (const auto& s : m.shards) {
      for (uint64_t k = 0; k < s.block_sha256.size(); ++k, ++index) {
        ByteRange g{s.range.begin + k * B, std::min(s.range.begin + (k + 1) * B, s.range.end)};
        bool failed;
        {
          std::lock_guard<std::mutex> lock(mu);
          failed = bad.has_value();
        }
        uint8_t* dest = st.buffer.data() + g.begin;
        if (failed) {  // drain into scratch so the exchange ends in step
          if (scratch.size() < B) scratch = HostBuffer(B);
          dest = scratch.data();
        }
        net::MessageHeader h = expect(channel, transfer::kBlock, {dest, static_cast<size_t>(g.size())}, deadline,
                                      o.cancel, fmt::format("block {}", index));
        if (h.op_seq != index)
          throw ProtocolError(fmt::format("state transfer: peer {} sent block {} where block {} was expected", peer,
                                          h.op_seq, index));
        {
          std::lock_guard<std::mutex> lock(mu);
          queue.push_back({&s, k, index, failed ? nullptr : dest, static_cast<size_t>(g.size())});
        }
        cv.notify_one();
      }
    }
  } catch (const PeerLostError& e) {
    stop_hasher();
    // Say how far the transfer got: nothing received so far is handed out.
    throw PeerLostError(e.peer(), fmt::format("state transfer of step {} ({}): sender lost after {} of {} blocks; the "
                                              "partial state is discarded: {}",
                                              m.step, format_bytes(total), index, total_blocks, e.what()));
  } catch (...) {
    stop_hasher();
    throw;
  }
  stop_hasher();
  if (bad) {
    send_small(channel, transfer::kVerdict, transfer::kBadBlock, bad_index, m.step, deadline, o.cancel);
    throw CorruptError(fmt::format(
        "state transfer: block {} (bytes [{}, {}) of {}) from peer {} fails its SHA-256 check; the state is rejected",
        bad_index, bad->second * B, std::min((bad->second + 1) * B, bad->first->range.size()), bad->first->file, peer));
  }
  send_small(channel, transfer::kVerdict, transfer::kOk, 0, m.step, deadline, o.cancel);
  st.tensors = tensors_in_range(st.manifest, st.range, st.buffer.data());
  double secs = std::chrono::duration<double>(Clock::now() - start).count();
  log::info("checkpoint", "received the state of step {} ({}) from peer {} in {:.2f} s, every block verified", m.step,
            format_bytes(total), peer, secs);
  return st;
}

}  // namespace meshtrain::checkpoint
