// A thin RAII layer over the SQLite C API for the market's databases (the devnet ledger; usable
// by any other SQLite store in market/). Every failure is a meshtrain::Error naming the
// database file: IoError for disk trouble, TimeoutError when the file stays locked past the busy
// timeout, InternalError for anything else (a bad statement is a bug).
//
// Internal to meshtrain (not installed). Not thread-safe: one Database per thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "meshtrain/core.h"
#include "meshtrain/crypto.h"

struct sqlite3;
struct sqlite3_stmt;

namespace meshtrain::market::sqlite {

class Database;

// A prepared statement. Bind indexes start at 1, column indexes at 0.
class Statement {
 public:
  Statement(Database& db, std::string_view sql);
  ~Statement();
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  // Any integer type; uint64_t values above INT64_MAX keep their bit pattern.
  template <typename T>
    requires std::is_integral_v<T>
  Statement& bind(int index, T value) {
    return bind_int64(index, static_cast<int64_t>(value));
  }
  Statement& bind_int64(int index, int64_t value);
  Statement& bind(int index, double value);
  Statement& bind(int index, std::string_view text);
  Statement& bind_blob(int index, crypto::ByteSpan bytes);
  Statement& bind_null(int index);
  int parameter_count() const;

  // Runs one step: true when a row is ready, false when the statement is done.
  bool step();
  // Runs a statement that returns no rows (or ignores them) to completion.
  void run();
  // Clears bindings and rewinds, ready for the next use.
  void reset();

  int64_t int64(int column) const;
  double real(int column) const;
  std::string text(int column) const;
  std::vector<uint8_t> blob(int column) const;
  bool is_null(int column) const;

 private:
  Database& db_;
  sqlite3_stmt* stmt_ = nullptr;
};

class Database {
 public:
  // Opens (creating if missing) the file. Throws IoError naming the path.
  explicit Database(const std::filesystem::path& path);
  ~Database();
  Database(const Database&) = delete;
  Database& operator=(const Database&) = delete;

  // Runs one or more statements without results (schema, pragmas).
  void exec(std::string_view sql);
  // A statement prepared once and reused: reset and with its bindings cleared on every call.
  Statement& cached(std::string_view sql);
  int64_t last_insert_id() const;
  int changes() const;

  sqlite3* handle() const { return db_; }
  const std::filesystem::path& path() const { return path_; }
  // Throws the error matching SQLite result `rc`, naming the file and `what`.
  [[noreturn]] void fail(int rc, std::string_view what) const;

 private:
  std::filesystem::path path_;
  sqlite3* db_ = nullptr;
  std::map<std::string, std::unique_ptr<Statement>, std::less<>> cache_;
};

// BEGIN IMMEDIATE (takes the write lock up front, so a transaction never fails half-way on a
// lock upgrade); rolled back unless commit() ran.
class Transaction {
 public:
  explicit Transaction(Database& db);
  ~Transaction();
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  void commit();

 private:
  Database& db_;
  bool done_ = false;
};

// A nested scope inside a Transaction: rollback() undoes only what ran since it began.
class Savepoint {
 public:
  Savepoint(Database& db, std::string name);
  ~Savepoint();
  Savepoint(const Savepoint&) = delete;
  Savepoint& operator=(const Savepoint&) = delete;
  void release();
  void rollback();

 private:
  Database& db_;
  std::string name_;
  bool done_ = false;
};

}  // namespace meshtrain::market::sqlite
