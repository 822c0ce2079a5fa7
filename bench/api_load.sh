#!/bin/bash
# The API under load (issue 12): 200 keep-alive wrk clients read one job's status for 15 s, then
# the same against a bare FastAPI app (one async route) on the same uvicorn. Prints wrk's figures.
#
#   bench/api_load.sh            # embedded mode (SQLite, polling worker)
#   bench/api_load.sh postgres   # PostgreSQL at 127.0.0.1:5432 (database baerase_load, recreated)
set -euo pipefail
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
export BAERASE_DATA_DIR="$work/data" BAERASE_API_KEY=bae_load_test_key_0000000000 BAERASE_SANDBOX_REQUIRED=false
port=8010

# A job to read: bare weights of a named architecture and two tiny images. The worker fails it at
# once (the weights do not fit), so its status stays put and no engine competes for the CPU.
python3 - <<'EOF'
import numpy as np, torch
torch.save({"w": torch.zeros(2)}, "model.pt")
np.savez("samples.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.arange(2))
EOF
cat > bare.py <<'EOF'
from fastapi import FastAPI
app = FastAPI()
@app.get("/jobs/{job_id}")
async def read(job_id: str):
    return {"status": "ok"}
EOF

if [ "${1:-embedded}" = postgres ]; then
  psql -q -h 127.0.0.1 -U postgres -c "drop database if exists baerase_load" -c "create database baerase_load"
  export BAERASE_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/baerase_load
  baerase db upgrade >/dev/null 2>&1
  baerase serve --port $port >serve.log 2>&1 &
  baerase worker >worker.log 2>&1 &
else
  baerase serve --embedded --port $port >serve.log 2>&1 &
fi
until curl -sf http://127.0.0.1:$port/healthz >/dev/null; do sleep 0.5; done
auth="Authorization: Bearer $BAERASE_API_KEY"
job=$(curl -sf -H "$auth" -F model=@model.pt -F samples=@samples.npz -F 'config={"arch":"small_cnn"}' \
      http://127.0.0.1:$port/jobs | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
sleep 3

echo "== BAERASE GET /jobs/{id} (${1:-embedded})"
wrk -t2 -c200 -d15s --latency -H "$auth" http://127.0.0.1:$port/jobs/$job | grep -E "Requests/sec|99%|Socket|Non-2xx"
kill $(jobs -p) && wait 2>/dev/null || true

uvicorn --app-dir "$work" bare:app --port $((port + 1)) >bare.log 2>&1 &
until curl -sf http://127.0.0.1:$((port + 1))/jobs/x >/dev/null; do sleep 0.5; done
echo "== bare FastAPI app"
wrk -t2 -c200 -d15s --latency http://127.0.0.1:$((port + 1))/jobs/x | grep -E "Requests/sec|99%|Socket|Non-2xx"
