@0xcd2b2ea0509b7754;
# meshtrain wire schemas. Payload bytes never live inside these messages: a header says how
# many bytes follow it on the same stream (bulk path) or in the next ZeroMQ frame (control path).

$import "/capnp/c++.capnp".namespace("meshtrain::wire");

struct MessageHeader {
  type @0 :UInt16;
  sender @1 :Data;          # Ed25519 public key (32 bytes) of the sender
  quorumId @2 :UInt64;
  step @3 :UInt64;
  opSeq @4 :UInt64;
  tag @5 :UInt32;
  payloadBytes @6 :UInt64;  # whole message, all streams together
  partOffset @7 :UInt64;    # where this stream's part starts (bulk channels)
  partBytes @8 :UInt64;     # bytes that follow this header on this stream
}

enum BulkSecurity {
  unset @0;
  encrypted @1;
  plain @2;
}

enum AeadAlgorithm {
  unset @0;
  aes256Gcm @1;
  chacha20Poly1305 @2;
}

# First message in each direction of a bulk stream. The signature covers the hello's fields
# and, for the server, the client's hello (see lib/net/handshake.cpp for the exact transcript).
struct BulkHello {
  version @0 :UInt16;
  identity @1 :Data;        # Ed25519 public key, 32 bytes
  ephemeral @2 :Data;       # X25519 public key for this stream, 32 bytes
  random @3 :Data;          # 32 fresh random bytes
  security @4 :BulkSecurity;
  aead @5 :AeadAlgorithm;
  channelId @6 :UInt64;
  streamIndex @7 :UInt32;
  streamCount @8 :UInt32;
  expectedPeer @9 :Data;    # client: the server identity it wants; server: empty
  signature @10 :Data;      # Ed25519, 64 bytes
}
