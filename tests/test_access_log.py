"""One access-log line per HTTP request, with its status, duration, model and tokens."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from .conftest import INFERNO


def test_each_request_gets_one_access_line_with_status_duration_model_and_tokens(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}
    env.update({"INFERNO_KERNEL__DATA_DIR": str(tmp_path / "data"),
                "INFERNO_PROTOCOLS__HTTP__PORT": "0"})
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([str(INFERNO), "--profile", "edge", "--set",
                                   'logging.format="json"', "--set",
                                   "protocols.http.access_log=true"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        url = ""
        while not url and server.poll() is None:
            for line in log.read_text().splitlines():
                if '"listening"' in line:
                    url = json.loads(line)["urls"][0]
            time.sleep(0.1)
        body = json.dumps({"model": "all-minilm-l6-v2", "input": ["hello", "world"]}).encode()
        request = urllib.request.Request(url + "/v1/embeddings?secret=in-the-query", body,
                                         {"Content-Type": "application/json",
                                          "X-Request-ID": "access-1"})
        with urllib.request.urlopen(request, timeout=60) as response:
            usage = json.loads(response.read())["usage"]
    finally:
        server.terminate()
        server.wait(30)
    lines = [json.loads(line) for line in log.read_text().splitlines()
             if line.startswith("{") and '"access"' in line]
    mine = [line for line in lines if line.get("request_id") == "access-1"]
    assert len(mine) == 1
    access = mine[0]
    assert access["status"] == 200
    assert access["path"] == "/v1/embeddings"  # the query string stays out of the log
    assert access["model"] == "all-minilm-l6-v2"
    assert access["tokens"] == usage["total_tokens"]
    assert access["ms"] > 0
