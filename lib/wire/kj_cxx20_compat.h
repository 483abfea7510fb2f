// Force-included (CMakeLists.txt) into every C++ file that sees Cap'n Proto's headers.
//
// Cap'n Proto 0.9's kj/string.h leaves out `const char* == StringPtr` (and `!=`, and the same for
// String) under C++20, counting on the reversed member operator==. Compilers that implement P2468
// (GCC 13+, Clang 16+) skip that reversed candidate when the class also declares operator!=, so
// capnp/blob.h's own `a == b.asString()` fails to compile there. Declaring them again restores
// what C++17 had; older compilers prefer these exact matches over the reversed candidate. The
// bodies compare two StringPtrs: `b == a` would pick these functions' own reversed form.
#pragma once

#include <kj/string.h>

#if __cpp_impl_three_way_comparison
#include <capnp/common.h>
#if CAPNP_VERSION < 10000
namespace kj {
inline bool operator==(const char* a, const StringPtr& b) { return b == StringPtr(a); }
inline bool operator!=(const char* a, const StringPtr& b) { return b != StringPtr(a); }
inline bool operator==(const char* a, const String& b) { return b == StringPtr(a); }
inline bool operator!=(const char* a, const String& b) { return b != StringPtr(a); }
}  // namespace kj
#endif
#endif
