// net_peer: the other process in the multi-process transport tests.
//
//   net_peer bulk-send   --key PEM --peer HEX --port P --bytes N --seed S [--streams K] [--plain]
//   net_peer control-echo --key PEM --server HEX --endpoint E --count N [--timeout-ms T]
//
// Exit codes: 0 success, 2 usage, 3 timeout, 4 auth refused / peer lost, 5 other error.
#include <cstdio>
#include <map>
#include <string>

#include "support/flags.h"
#include "meshtrain/net.h"
#include "support/pattern.h"

using namespace meshtrain;

namespace {

int exit_code_for(const Error& e) {
  switch (e.code()) {
    case ErrorCode::Timeout: return 3;
    case ErrorCode::Auth:
    case ErrorCode::PeerLost: return 4;
    default: return 5;
  }
}

int bulk_send(std::map<std::string, std::string>& a) {
  auto self = crypto::Identity::load_pem(a.at("--key"));
  auto peer = crypto::PeerId::from_hex(a.at("--peer"));
  net::BulkOptions options;
  if (a.count("--plain")) options.security = net::BulkSecurity::Plain;
  uint64_t bytes = std::stoull(a.at("--bytes"));
  uint32_t streams = a.count("--streams") ? std::stoul(a.at("--streams")) : 1;
  std::vector<uint8_t> payload(bytes);
  test_support::fill_pattern(payload, std::stoull(a.at("--seed")));
  auto channel = net::BulkChannel::connect(self, peer, "127.0.0.1", static_cast<uint16_t>(std::stoul(a.at("--port"))),
                                           streams, options, Deadline::after(std::chrono::seconds(10)));
  net::MessageHeader h;
  h.step = 7;
  h.op_seq = 1;
  channel.send(h, payload, Deadline::after(std::chrono::seconds(60)));
  // Wait for the receiver's acknowledgement so our close cannot race its last read.
  net::Message ack = channel.recv(Deadline::after(std::chrono::seconds(60)));
  return ack.header.step == 7 ? 0 : 5;
}

int control_echo(std::map<std::string, std::string>& a) {
  auto self = crypto::Identity::load_pem(a.at("--key"));
  auto server = crypto::PeerId::from_hex(a.at("--server"));
  int count = std::stoi(a.at("--count"));
  auto timeout = std::chrono::milliseconds(a.count("--timeout-ms") ? std::stoi(a.at("--timeout-ms")) : 10000);
  net::ControlClient client(self, server, a.at("--endpoint"));
  net::MessageHeader hello;
  hello.type = static_cast<uint16_t>(net::MessageType::Hello);
  client.send(hello);
  for (int i = 0; i < count; ++i) {
    net::Message m = client.recv(Deadline::after(timeout));
    client.send(m.header, m.payload);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: net_peer bulk-send|control-echo --flag value ...\n");
    return 2;
  }
  std::string mode = argv[1];
  std::map<std::string, std::string> args = test_support::parse_flags(argc, argv, 2);
  try {
    if (mode == "bulk-send") return bulk_send(args);
    if (mode == "control-echo") return control_echo(args);
    std::fprintf(stderr, "net_peer: unknown mode %s\n", mode.c_str());
    return 2;
  } catch (const Error& e) {
    std::fprintf(stderr, "net_peer %s: %s error: %s\n", mode.c_str(), error_code_name(e.code()).data(), e.what());
    return exit_code_for(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "net_peer %s: %s\n", mode.c_str(), e.what());
    return 5;
  }
}
