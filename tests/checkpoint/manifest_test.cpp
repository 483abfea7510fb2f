// The JSON reader/writer and the manifest parser: round trips, errors that name the field,
// limits, and fuzzing (random bytes, truncations, mutations) that must only ever produce
// meshtrain errors.
#include <gtest/gtest.h>

#include <random>

#include "checkpoint/helpers.h"
#include "core/json.h"
#include "support/temp_dir.h"

using namespace meshtrain;
using namespace meshtrain::checkpoint;
using namespace meshtrain::test_support;

namespace {

TEST(Json, RoundTripsValuesExactly) {
  json::Writer w;
  w.begin_object();
  w.key("big").value(uint64_t{18446744073709551615ull});
  w.key("neg").value(int64_t{-9223372036854775807ll - 1});
  w.key("text").value(std::string("quote\" backslash\\ newline\n tab\t ctrl\x01 ünï ✓"));
  w.key("list").begin_array(true).value(1).value(true).null().end_array();
  w.key("empty").begin_object().end_object();
  w.end_object();
  std::string text = w.take();
  json::Value v = json::parse(text, "test");
  json::Field f(v, "test");
  EXPECT_EQ(f.at("big").u64(), 18446744073709551615ull);
  EXPECT_EQ(f.at("neg").i64(), -9223372036854775807ll - 1);
  EXPECT_EQ(f.at("text").str(), "quote\" backslash\\ newline\n tab\t ctrl\x01 ünï ✓");
  EXPECT_EQ(f.at("list").array_size(), 3u);
  EXPECT_TRUE(f.at("list").at(1).boolean());
  EXPECT_EQ(json::parse("\"\\u00e9\\ud83d\\ude00\"", "t").text, "é😀");
}

TEST(Json, SyntaxErrorsNameLineAndColumn) {
  expect_error<CorruptError>([] { json::parse("{\n  \"a\": 1,\n  \"b\" 2\n}", "doc.json"); },
                             {"doc.json", "line 3", "column 7", "':'"});
  expect_error<CorruptError>([] { json::parse("{\"a\": 1, \"a\": 2}", "d"); }, {"duplicate member \"a\""});
  expect_error<CorruptError>([] { json::parse("[1, 2", "d"); }, {"unexpected end"});
  expect_error<CorruptError>([] { json::parse("\"\xff\"", "d"); }, {"UTF-8"});
  expect_error<CorruptError>([] { json::parse("01", "d"); }, {"leading zero"});
  expect_error<CorruptError>([] { json::parse("\"\\ud800\"", "d"); }, {"surrogate"});
  expect_error<CorruptError>([] { json::parse("{} x", "d"); }, {"after the end"});
  expect_error<CorruptError>([] { json::parse("", "d"); }, {"empty"});
}

TEST(Json, Limits) {
  std::string deep(100, '[');
  expect_error<CorruptError>([&] { json::parse(deep, "d"); }, {"nested deeper than 32"});
  json::ParseLimits small;
  small.max_bytes = 10;
  expect_error<CorruptError>([&] { json::parse("[1,2,3,4,5,6]", "d", small); }, {"over the limit of 10"});
  json::ParseLimits few;
  few.max_values = 3;
  expect_error<CorruptError>([&] { json::parse("[1,2,3,4]", "d", few); }, {"more than 3 values"});
}

TEST(Json, FieldErrorsNameThePath) {
  json::Value v = json::parse(R"({"a": {"b": [1, "x", -3, 1.5]}})", "f.json");
  json::Field f(v, "f.json");
  expect_error<CorruptError>([&] { f.at("a").at("b").at(1).u64(); }, {"f.json", "field a.b[1]", "expected a number"});
  expect_error<CorruptError>([&] { f.at("a").at("b").at(2).u64(); }, {"a.b[2]", "non-negative integer"});
  expect_error<CorruptError>([&] { f.at("a").at("b").at(3).i64(); }, {"a.b[3]", "integer"});
  expect_error<CorruptError>([&] { f.at("a").at("c"); }, {"field a.c is missing"});
  expect_error<CorruptError>([&] { f.at("a").at("b").at(0).u64(0); }, {"out of range"});
}

TEST(Base64, RoundTripAndErrors) {
  std::mt19937_64 rng(3);
  for (size_t n = 0; n < 70; ++n) {
    std::vector<uint8_t> b(n);
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    EXPECT_EQ(json::base64_decode(json::base64_encode(b.data(), b.size()), "b"), b);
  }
  EXPECT_EQ(json::base64_encode(reinterpret_cast<const uint8_t*>("foobar"), 6), "Zm9vYmFy");
  EXPECT_THROW(json::base64_decode("Zm9", "b"), CorruptError);
  EXPECT_THROW(json::base64_decode("Zm9v!mFy", "b"), CorruptError);
  EXPECT_THROW(json::base64_decode("Zh==", "b"), CorruptError);  // non-canonical padding bits
  EXPECT_THROW(json::base64_decode("Z===", "b"), CorruptError);
}

// A real manifest (4 writers) for the manifest tests.
struct RealManifest {
  TempDir dir;
  TestState s = make_test_state(5, 50);
  std::string text;
  RealManifest() {
    auto r = save_with_writers(dir.path(), s, 4);
    text = read_text(r.dir / "manifest.json");
  }
  // The text with the first occurrence of `from` replaced by `to`.
  std::string with(const std::string& from, const std::string& to) const {
    std::string t = text;
    auto pos = t.find(from);
    EXPECT_NE(pos, std::string::npos) << from;
    if (pos != std::string::npos) t.replace(pos, from.size(), to);
    return t;
  }
};

TEST(Manifest, RoundTrip) {
  RealManifest r;
  Manifest m = parse_manifest(r.text, "m");
  EXPECT_EQ(m.step, 50u);
  EXPECT_EQ(m.world_size, 4u);
  EXPECT_EQ(m.tensors.size(), r.s.tensors.size());
  EXPECT_EQ(m.blobs, r.s.blobs);
  EXPECT_EQ(m.metadata, r.s.metadata);
  EXPECT_EQ(manifest_to_json(m), r.text);
}

TEST(Manifest, MalformedFieldsAreNamed) {
  RealManifest r;
  struct Case {
    std::string from, to;
    std::vector<std::string> expect;
  };
  std::vector<Case> cases = {
      {"\"world_size\": 4", "\"world_size\": -1", {"field world_size", "non-negative"}},
      {"\"world_size\": 4", "\"world_size\": 0", {"field world_size", "at least 1"}},
      {"\"world_size\": 4", "\"world_size\": 3", {"field shards", "4 entries"}},
      {"\"format_version\": 1", "\"format_version\": 2", {"format_version", "newer"}},
      {"\"format\": \"meshtrain-checkpoint\"", "\"format\": \"zip\"", {"field format"}},
      {"\"dtype\": \"float16\"", "\"dtype\": \"float99\"", {"tensors[1].dtype", "float99"}},
      {"\"shape\": [37, 129]", "\"shape\": [37, 130]", {"tensors[0].bytes", "shape"}},
      {"\"file\": \"shard-0-of-4.bin\"", "\"file\": \"../../etc/passwd\"", {"shards[0].file"}},
      {"\"alignment\": 64", "\"alignment\": 32", {"field alignment"}},
      {"\"block_bytes\": 4096", "\"block_bytes\": 100", {"field block_bytes"}},
      {"\"hash\": \"sha256\"", "\"hash\": \"md5\"", {"field hash", "md5"}},
      {"\"step\": 50", "\"step\": \"50\"", {"field step", "expected a number"}},
      {"\"step\": 50", "\"stepp\": 50", {"unknown member \"stepp\""}},
      {"\"base64\": \"AQIDBAUGBw==\"", "\"base64\": \"AQIDBAUG\"", {"blobs.data_cursor.bytes", "7 bytes"}},
      {"\"base64\": \"AQIDBAUGBw==\"", "\"base64\": \"AQID*AUGBw==\"", {"blobs.data_cursor.base64", "base64"}},
      {"\"rank\": 1", "\"rank\": 2", {"shards[1]"}},
      {"\"name\": \"model/norm.bias\"", "\"name\": \"model/embed.weight\"", {"tensors[1].name", "duplicate"}},
      {"\"name\": \"model/norm.bias\"", "\"name\": \"\"", {"tensors[1].name"}},
      {"\"total_bytes\": ", "\"total_bytes\": 1", {"total_bytes"}},
      // Names a save would refuse: control characters (an escape sequence for `inspect`'s
      // terminal), shown escaped in the message.
      {"\"name\": \"model/norm.bias\"", "\"name\": \"model/\\u001b[2Jbias\"",
       {"tensors[1].name", "\\x1b", "control character"}},
      {"\"data_cursor\": {", "\"data\\u0007cursor\": {", {"field blobs", "name", "control character"}},
  };
  for (const auto& c : cases) {
    std::string text = r.with(c.from, c.to);
    try {
      parse_manifest(text, "step-50/manifest.json");
      ADD_FAILURE() << "accepted: " << c.to;
    } catch (const CorruptError& e) {
      std::string m = e.what();
      EXPECT_NE(m.find("step-50/manifest.json"), std::string::npos) << m;
      for (const auto& part : c.expect) EXPECT_NE(m.find(part), std::string::npos) << c.to << " -> " << m;
    }
  }
}

TEST(Manifest, Limits) {
  RealManifest r;
  ManifestLimits l;
  l.max_manifest_bytes = 100;
  expect_error<CorruptError>([&] { parse_manifest(r.text, "m", l); }, {"over the limit"});
  l = ManifestLimits{};
  l.max_tensors = 3;
  expect_error<CorruptError>([&] { parse_manifest(r.text, "m", l); }, {"field tensors", "limit of 3"});
  l = ManifestLimits{};
  l.max_world_size = 2;
  expect_error<CorruptError>([&] { parse_manifest(r.text, "m", l); }, {"world_size", "out of range"});
  l = ManifestLimits{};
  l.max_blob_bytes = 10;
  expect_error<CorruptError>([&] { parse_manifest(r.text, "m", l); }, {"blobs"});
  l = ManifestLimits{};
  l.max_total_bytes = 1000;
  expect_error<CorruptError>([&] { parse_manifest(r.text, "m", l); }, {"total_bytes"});
}

// Every failure must be a meshtrain::Error (CorruptError): never a crash, a std::exception of
// another kind, or an accepted manifest that breaks the invariants the loader relies on.
void fuzz_one(const std::string& text) {
  try {
    Manifest m = parse_manifest(text, "fuzz");
    uint64_t pos = 0;
    for (const auto& s : m.shards) {
      ASSERT_EQ(s.range.begin, pos);
      ASSERT_EQ(s.block_sha256.size(), (s.range.size() + m.block_bytes - 1) / m.block_bytes);
      pos = s.range.end;
    }
    ASSERT_EQ(pos, m.total_bytes);
    for (const auto& t : m.tensors) ASSERT_LE(t.offset + t.bytes, m.total_bytes);
  } catch (const CorruptError&) {
  } catch (const std::exception& e) {
    FAIL() << "unexpected exception: " << e.what();
  }
}

TEST(ManifestFuzz, RandomBytes) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 3000; ++i) {
    std::string s(rng() % 300, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    if (i % 3 == 0 && !s.empty()) s[0] = '{';
    fuzz_one(s);
  }
}

TEST(ManifestFuzz, EveryTruncation) {
  RealManifest r;
  for (size_t n = 0; n < r.text.size(); n += (n < 2000 ? 1 : 7)) fuzz_one(r.text.substr(0, n));
}

TEST(ManifestFuzz, Mutations) {
  RealManifest r;
  std::mt19937_64 rng(2);
  const std::string alphabet = "{}[]\",:0123456789-eE.abcdef \\u";
  for (int i = 0; i < 4000; ++i) {
    std::string t = r.text;
    int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      size_t pos = rng() % t.size();
      switch (rng() % 3) {
        case 0: t[pos] = alphabet[rng() % alphabet.size()]; break;
        case 1: t.erase(pos, 1 + rng() % 8); break;
        default: t.insert(pos, 1, alphabet[rng() % alphabet.size()]); break;
      }
      if (t.empty()) break;
    }
    fuzz_one(t);
  }
}

TEST(ManifestFuzz, SidecarRandomAndTruncated) {
  RealManifest r;
  std::string sidecar = read_text(r.dir / "step-50" / "shard-1-of-4.json");
  EXPECT_EQ(parse_shard_record(sidecar, "s").shard.rank, 1u);
  for (size_t n = 0; n < sidecar.size(); n += 3) {
    try {
      parse_shard_record(sidecar.substr(0, n), "s");
    } catch (const CorruptError&) {
    }
  }
}

// A manifest moved in from another step (with its shards) does not load as that step.
TEST(ManifestOnDisk, StepThatDisagreesWithItsDirectoryIsRefused) {
  RealManifest r;
  fs::rename(r.dir / "step-50", r.dir / "step-60");
  expect_error<CorruptError>([&] { Checkpoint::open(r.dir / "step-60"); },
                             {"step-60/manifest.json", "field step", "50"});
  fs::rename(r.dir / "step-60", r.dir / "backup");  // a directory not named step-<N>: its manifest says which
  EXPECT_EQ(Checkpoint::open(r.dir / "backup").manifest().step, 50u);
}

TEST(ManifestOnDisk, GarbageManifestNamesTheFile) {
  RealManifest r;
  write_text(r.dir / "step-50" / "manifest.json", "{\"format\": \"meshtrain-checkpoint\", \"format_version\": 1,");
  expect_error<CorruptError>([&] { Checkpoint::open(r.dir.path()); }, {"step-50/manifest.json", "line 1"});
  write_text(r.dir / "step-50" / "manifest.json", std::string(70u << 20, ' '));
  expect_error<CorruptError>([&] { Checkpoint::open(r.dir.path()); }, {"manifest.json", "over the limit"});
}

}  // namespace
