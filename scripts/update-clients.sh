#!/usr/bin/env bash
# Move the real clients of the conformance suite (testdata/clients) to their
# newest versions on the npm registry and run the suite against them. If it
# passes, commit testdata/clients/package.json and package-lock.json, and put
# the new versions in the READMEs' compatibility tables (which
# TestReadmeClientVersions checks). Arguments package@version try others.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=("$@")
if [ ${#pkgs[@]} -eq 0 ]; then
  pkgs=(@anthropic-ai/claude-code@latest @openai/codex@latest @anthropic-ai/sdk@latest openai@latest)
fi
npm install --prefix testdata/clients --save-exact --no-audit --no-fund "${pkgs[@]}"
npm ls --prefix testdata/clients --depth=0
CCLOAD_REQUIRE_CLIENTS=1 go test -count=1 -run '^TestClients$' -v .
