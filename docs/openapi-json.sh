#!/usr/bin/env bash
# Writes docs/openapi.json (the copy GET /openapi.json serves) from docs/openapi.yaml.
# Needs Python 3 with PyYAML (schemathesis brings it: PYTHON=/path/to/venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")"
"${PYTHON:-python3}" - <<'PY'
import json, yaml
with open("openapi.yaml", encoding="utf-8") as f:
    document = yaml.safe_load(f)
with open("openapi.json", "w", encoding="utf-8") as f:
    json.dump(document, f, indent=2, ensure_ascii=False)
    f.write("\n")
PY
