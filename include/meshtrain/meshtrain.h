// meshtrain: the umbrella header. Includes every public module header; include the module
// headers themselves where build time matters.
#pragma once

#include "meshtrain/core.h"        // errors, logging, deadlines, cancel tokens, buffer views
#include "meshtrain/crypto.h"      // Ed25519 identities, SHA-256, X25519, AEAD
#include "meshtrain/net.h"         // control path (CurveZMQ) and bulk streams (AEAD over TCP)
#include "meshtrain/coord.h"       // the coordinator and its messages
#include "meshtrain/collective.h"  // Communicator: ring all-reduce and the step retry loop
#include "meshtrain/compress.h"    // gradient codecs with error feedback
#include "meshtrain/checkpoint.h"  // sharded, verified, asynchronous checkpoints
