// Generates an Ed25519 identity, signs a message, verifies the signature (and that a tampered
// message fails), and prints the key's fingerprint. Exit status 0 on success.
#include <cstdio>
#include <string>
#include <string_view>

// The umbrella header: also proves every installed public header compiles on its own.
#include <meshtrain/meshtrain.h>

int main() {
  namespace crypto = meshtrain::crypto;
  try {
    crypto::Identity id = crypto::Identity::generate();
    std::string_view text = "step 42: cumulative 1000";
    crypto::ByteSpan message(reinterpret_cast<const uint8_t*>(text.data()), text.size());
    crypto::Signature signature = id.sign(message);

    crypto::verify(id.public_key(), message, signature, "consumer message");

    std::string_view tampered_text = "step 42: cumulative 9000";
    crypto::ByteSpan tampered(reinterpret_cast<const uint8_t*>(tampered_text.data()),
                              tampered_text.size());
    if (crypto::is_valid_signature(id.public_key(), tampered, signature)) {
      std::fprintf(stderr, "error: a tampered message verified\n");
      return 1;
    }
    std::printf("public key  %s\n", id.public_key().hex().c_str());
    std::printf("fingerprint %s\n", id.public_key().fingerprint().c_str());
    std::printf("signature verified\n");
    return 0;
  } catch (const meshtrain::Error& e) {
    std::fprintf(stderr, "error (%s): %s\n", std::string(meshtrain::error_code_name(e.code())).c_str(),
                 e.what());
    return 1;
  }
}
