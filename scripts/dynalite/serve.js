#!/usr/bin/env node
// Runs dynalite's own CLI, but survives clients that hang up mid-request.
//
// dynalite rethrows a request's 'error' event ("aborted", ECONNRESET), which kills the whole
// server when any client process is killed mid-call (our restart tests do exactly that).
// Such an error concerns one connection only, so it is logged and the server carries on.
//
// Usage: node serve.js <path to dynalite/cli.js> [dynalite options...]
'use strict'

const cli = process.argv[2]
process.argv.splice(2, 1)

const CLIENT_GONE = new Set(['ECONNRESET', 'EPIPE', 'ECONNABORTED'])

process.on('uncaughtException', (err) => {
  if (err && (CLIENT_GONE.has(err.code) || err.message === 'aborted')) {
    console.error(`dynalite: client went away mid-request (${err.code || err.message}); continuing`)
    return
  }
  console.error(err)
  process.exit(1)
})

require(cli)
