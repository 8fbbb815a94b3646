"""The stdin protocol as a shell pipeline uses it: ``inferno --protocol stdin`` as a subprocess
with the edge profile's real models (Gemma for text, MiniLM for embeddings)."""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import os
import pty
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from inferno.plugins.protocols.stdin import escape
from inferno.plugins.protocols.stdio import Output

from .conftest import INFERNO

pytestmark = pytest.mark.timeout(180)

COMMAND = [str(INFERNO), "--profile", "edge", "--protocol", "stdin"]
GEMMA = {"model": "gemma-3-270m", "max_tokens": 4, "temperature": 0}
TEXT_MODE = ["--set", 'protocols.stdin.mode="text"']
#: Gemma's end-of-generation tokens (<eos>, <end_of_turn>, <eot>), banned to keep it going.
NO_END = {"1": -100, "106": -100, "212": -100}


def isolated_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNO_")}
    return {**env, "INFERNO_KERNEL__DATA_DIR": str(data_dir)}


def jsonl(*requests: Any) -> bytes:
    """Lines for stdin: a dict is written as JSON, a str verbatim (for broken lines)."""
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n"
                    for r in requests)


def run(data: bytes, *args: str, tmp: Path, env: Mapping[str, str] | None = None,
        timeout: float = 150) -> subprocess.CompletedProcess[bytes]:
    """``inferno ... < file``: standard input is a regular file, as from a shell redirect."""
    source = tmp / "input.txt"
    source.write_bytes(data)
    with source.open("rb") as stdin:
        return subprocess.run([*COMMAND, *args], stdin=stdin, capture_output=True,
                              env=dict(env or isolated_env(tmp / "data")), timeout=timeout,
                              check=False)


def strict_json(line: str) -> Any:
    """JSON as the standard has it: no NaN or Infinity, which Python's json accepts."""
    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} is not JSON: {line[:200]}")
    return json.loads(line, parse_constant=refuse)


def objects(stdout: bytes) -> list[dict[str, Any]]:
    """Every stdout line as a JSON object; fails on any line that is not one."""
    lines = stdout.decode().splitlines()
    assert stdout.endswith(b"\n") or not stdout, "the last line is cut short"
    parsed = [strict_json(line) for line in lines]
    assert all(isinstance(item, dict) for item in parsed)
    return parsed


def by_id(lines: list[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    found: dict[Any, list[dict[str, Any]]] = {}
    for line in lines:
        found.setdefault(line["id"], []).append(line)
    return found


# --------------------------------------------------------------------------- a mixed file

MIXED = jsonl(
    {"id": "emb", "model": "minilm", "input": "a sentence to embed"},          # 1
    {"id": "plain", **GEMMA, "prompt": "The capital of France is"},           # 2
    "{this is not json",                                                      # 3
    "",                                                                       # 4 (skipped)
    [1, 2, 3],                                                                # 5
    {"id": "ghost", "model": "no-such-model", "input": "x"},                  # 6
    {"id": "stream", **GEMMA, "stream": True,                                 # 7
     "messages": [{"role": "user", "content": "Say hello"}]},
    {"id": "negative", **GEMMA, "prompt": "x", "max_tokens": -1},             # 8
    {"model": "minilm", "input": "no id: the line number stands in"},         # 9
    {"id": "what", "model": "minilm"},                                        # 10
    {"id": "last", "type": "embeddings", "model": "minilm", "input": "end"},  # 11
)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[bytes]:
    return run(MIXED, tmp=tmp_path_factory.mktemp("mixed"))


def test_a_mixed_file_exits_0_with_every_stdout_line_a_whole_json_object(mixed):
    assert mixed.returncode == 0, mixed.stderr.decode()[-2000:]
    lines = objects(mixed.stdout)
    assert {line["type"] for line in lines} == {"done", "error", "delta"}


def test_every_request_ends_with_exactly_one_done_or_error_line_carrying_its_id(mixed):
    ends = [line for line in objects(mixed.stdout) if line["type"] in ("done", "error")]
    ids = [line["id"] for line in ends]
    assert sorted(map(str, ids)) == sorted(map(str, [
        "emb", "plain", 3, 5, "ghost", "stream", "negative", 9, "what", "last"]))


def test_bad_lines_get_error_lines_naming_their_line_number_and_the_problem(mixed):
    errors = {line["line"]: line for line in objects(mixed.stdout) if line["type"] == "error"}
    assert set(errors) == {3, 5, 6, 8, 10}
    assert errors[3]["id"] == 3
    assert errors[3]["error"]["code"] == "invalid_json"
    assert "line 3 is not valid JSON" in errors[3]["error"]["message"]
    assert "must be a JSON object" in errors[5]["error"]["message"]
    assert errors[6]["id"] == "ghost"
    assert errors[6]["error"] | {"message": ""} == {
        "message": "", "type": "not_found_error", "param": "model", "code": "model_not_found",
        "status": 404}
    assert errors[8]["error"]["param"] == "max_tokens"
    assert errors[8]["error"]["status"] == 400
    assert errors[10]["error"]["code"] == "missing_type"


def test_embeddings_lines_carry_vectors_and_usage(mixed):
    found = by_id(objects(mixed.stdout))
    (emb,) = found["emb"]
    assert emb["type"] == "done"
    assert emb["model"] == "minilm"
    assert len(emb["data"][0]["embedding"]) == 384
    assert emb["usage"]["prompt_tokens"] > 0
    (numbered,) = found[9]
    assert numbered["type"] == "done"
    assert len(numbered["data"][0]["embedding"]) == 384


def test_a_plain_completion_is_one_done_line_with_text_finish_reason_and_usage(mixed):
    (plain,) = by_id(objects(mixed.stdout))["plain"]
    assert plain["type"] == "done"
    assert plain["model"] == "gemma-3-270m"
    assert plain["text"]
    assert plain["finish_reason"] in ("stop", "length")
    assert 0 < plain["usage"]["completion_tokens"] <= GEMMA["max_tokens"]


def test_a_stream_is_delta_lines_then_one_done_line(mixed):
    lines = by_id(objects(mixed.stdout))["stream"]
    *deltas, done = lines
    assert deltas
    assert all(line["type"] == "delta" and line["delta"] for line in deltas)
    assert done["type"] == "done"
    assert "text" not in done
    assert done["finish_reason"] == "stop" or \
        done["usage"]["completion_tokens"] == GEMMA["max_tokens"]


def test_logs_go_to_stderr_and_stdout_carries_data_alone(mixed):
    stderr = mixed.stderr.decode()
    assert "ready" in stderr
    assert "input done" in stderr
    assert b"ready" not in mixed.stdout
    assert b"[info" not in mixed.stdout


def test_lines_that_are_no_request_get_400_error_lines_and_the_next_line_still_runs(tmp_path):
    result = run(jsonl(
        {"type": [], "prompt": "x"},                                     # 1
        {"type": {"chat": True}, "input": "x"},                          # 2
        "[" * 100_000 + "]" * 100_000,                                   # 3
        '{"id": NaN, "model": "minilm", "input": "x"}',                  # 4
        '{"id": Infinity, "model": "minilm", "input": "x"}',             # 5
        '{"id": -Infinity, "model": "minilm", "input": "x"}',            # 6
        '{"id": 1' + "0" * 5000 + ', "model": "minilm", "input": "x"}',  # 7
        {"id": "b", "model": "minilm", "input": "hi"}), tmp=tmp_path)    # 8
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    lines = objects(result.stdout)  # NaN echoed back would fail here
    errors = {line["line"]: line for line in lines if line["type"] == "error"}
    assert set(errors) == {1, 2, 3, 4, 5, 6, 7}
    assert all(e["error"]["status"] == 400 and e["id"] == n for n, e in errors.items())
    assert [errors[n]["error"]["param"] for n in (1, 2)] == ["type", "type"]
    assert "got an array" in errors[1]["error"]["message"]
    assert {errors[n]["error"]["code"] for n in (3, 7)} == {"invalid_json"}
    assert "too deeply" in errors[3]["error"]["message"]
    assert {errors[n]["error"]["param"] for n in (4, 5, 6)} == {"id"}
    assert "finite" in errors[4]["error"]["message"]
    (done,) = by_id(lines)["b"]
    assert done["type"] == "done"
    assert "Traceback" not in result.stderr.decode()


#: ``inferno`` with a bug planted where each line is turned into a request: the input "break"
#: raises, as an unforeseen bug in Inferno would.
PLANTED_BUG = """
import sys
from inferno.kernel.cli import main
from inferno.plugins.protocols.stdin import StdinProtocol

merged = StdinProtocol._merged

def broken(self, operation, body):
    if body.get("input") == "break":
        raise RuntimeError("a planted bug")
    return merged(self, operation, body)

StdinProtocol._merged = broken
main(sys.argv[1:])
"""


@pytest.mark.parametrize("mode", ["json", "text"])
def test_a_line_that_breaks_inferno_gets_a_500_and_the_next_lines_still_run(tmp_path, mode):
    """The safety net under every line: whatever fails reading a line costs that line only."""
    source = tmp_path / "input.txt"
    if mode == "json":
        source.write_bytes(jsonl({"id": "x", "model": "minilm", "input": "break"},
                                 {"id": "y", "model": "minilm", "input": "fine"}))
    else:
        source.write_bytes(b"break\nfine\n")
    with source.open("rb") as stdin:
        result = subprocess.run(
            [sys.executable, "-c", PLANTED_BUG, *COMMAND[1:], "--set",
             'protocols.stdin.model="minilm"', "--set", f'protocols.stdin.mode="{mode}"'],
            stdin=stdin, capture_output=True, env=isolated_env(tmp_path / "data"), timeout=150,
            check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr[-2000:]
    assert "RuntimeError: a planted bug" in stderr  # logged with its traceback
    assert "line failed" in stderr
    if mode == "text":
        broken, fine = result.stdout.decode().splitlines()
        assert broken == ""
        assert len(json.loads(fine)) == 384
        return
    found = by_id(objects(result.stdout))
    (error,) = found["x"]
    assert error["error"]["status"] == 500
    assert error["error"]["code"] == "internal_error"
    assert error["line"] == 1
    assert found["y"][0]["type"] == "done"


def test_debug_logging_still_leaves_stdout_to_data(tmp_path):
    result = run(jsonl({"id": 1, "model": "minilm", "input": "x"}, "oops"),
                 "--set", 'logging.level="debug"', tmp=tmp_path)
    assert result.returncode == 0
    assert [line["type"] for line in objects(result.stdout)] == ["error", "done"]
    assert "[debug" in result.stderr.decode()


# --------------------------------------------------------------------------- pipes


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``inferno ...`` with pipes on all three streams; killed at the end if still running."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, stdin: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
        started.append(subprocess.Popen([*COMMAND, *args], stdin=stdin, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE,
                                        env=isolated_env(tmp_path / "data")))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_at_eof_the_requests_in_flight_finish_before_exit(spawn):
    """The pipeline waits for its own requests before it asks the kernel to shut down, so
    even a kernel that would give in-flight requests no time (drain_timeout) loses none."""
    process = spawn("--set", "kernel.drain_timeout=0.001")
    stdout, stderr = process.communicate(jsonl(
        *({"id": n, "model": "minilm", "input": f"sentence {n}"} for n in range(20)),
        {"id": "slow-last", **GEMMA, "prompt": "Once upon a time"}), timeout=150)
    assert process.returncode == 0, stderr.decode()[-2000:]
    ends = [line for line in objects(stdout) if line["type"] == "done"]
    assert {line["id"] for line in ends} == {*range(20), "slow-last"}


def test_max_concurrent_1_answers_in_input_order(spawn):
    process = spawn("--set", "protocols.stdin.max_concurrent=1")
    stdout, _ = process.communicate(jsonl(
        *({"id": n, "model": "minilm", "input": f"sentence {n}"} for n in range(12))),
        timeout=120)
    assert [line["id"] for line in objects(stdout)] == list(range(12))


def test_a_closed_stdout_ends_inferno_quietly_with_exit_0(spawn):
    """``inferno ... | head -1``: the reader goes away while answers are still coming and
    input is still open."""
    process = spawn()
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write(jsonl(*({"id": n, "model": "minilm", "input": f"sentence {n}"}
                                for n in range(100))))  # more answers than a pipe holds
    process.stdin.flush()
    first = json.loads(process.stdout.readline())
    process.stdout.close()
    closed = time.monotonic()
    returncode = process.wait(timeout=60)
    stderr = process.stderr.read().decode() if process.stderr else ""
    process.stdin.close()
    assert first["id"] == 0
    assert first["type"] == "done"
    assert returncode == 0, stderr[-2000:]
    assert time.monotonic() - closed < 15
    assert "standard output closed" in stderr
    for noise in ("Traceback", "Exception ignored", "BrokenPipeError"):
        assert noise not in stderr


def test_sigterm_stops_a_pipeline_whose_input_is_still_open(spawn):
    process = spawn()
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write(jsonl({"id": 1, "model": "minilm", "input": "x"}))
    process.stdin.flush()
    assert json.loads(process.stdout.readline())["id"] == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    process.stdin.close()


def queued_bytes(pipe: Any) -> int:
    """Bytes written into ``pipe`` and not read yet."""
    count = array.array("i", [0])
    fcntl.ioctl(pipe.fileno(), termios.FIONREAD, count)
    return count[0]


def test_sigterm_stops_inferno_promptly_while_nobody_reads_its_stdout(spawn):
    """A reader that stopped reading fills the pipe; Inferno itself must not freeze on it."""
    process = spawn()
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write(jsonl(*({"id": n, "model": "minilm", "input": f"sentence {n}"}
                                for n in range(300))))  # ~2.4 MB of answers
    process.stdin.flush()
    # Half full is enough: the rest of the answers cannot fit, and a pipe written line by line
    # may be full well before its capacity (it fills whole pages).
    half = fcntl.fcntl(process.stdout.fileno(), fcntl.F_GETPIPE_SZ) // 2
    deadline = time.monotonic() + 60
    while queued_bytes(process.stdout) < half:
        assert time.monotonic() < deadline, "no answers came on standard output"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 8  # kernel.stop_timeout is 10 s
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert "standard output is not being read" in stderr
    assert "Traceback" not in stderr
    process.stdin.close()


def test_a_request_still_running_at_stop_timeout_gets_an_error_line_before_exit(spawn):
    """SIGTERM gives a long generation stop_timeout; then it is cancelled, and its cleanup
    (the model let go, its error line written) finishes before Inferno exits."""
    process = spawn("--set", "kernel.stop_timeout=2", "--set", "kernel.drain_timeout=0.5")
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write(jsonl({"id": "long", **GEMMA, "max_tokens": 2000, "stream": True,
                               "logit_bias": NO_END,
                               "messages": [{"role": "user", "content": "Tell a story"}]}))
    process.stdin.flush()
    first = [json.loads(process.stdout.readline())]
    assert first[0]["type"] == "delta"
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert time.monotonic() - signalled < 4
    *deltas, last = first + objects(stdout)
    assert {line["type"] for line in deltas} == {"delta"}
    assert last["id"] == "long"
    assert last["type"] == "error"
    assert last["error"] | {"message": ""} == {
        "message": "", "type": "server_error", "param": None, "code": "shutdown",
        "status": 503}
    assert "failed to stop" not in stderr.decode()


async def test_output_holds_writers_back_past_its_limit_and_lets_them_go_as_the_reader_reads(
        ) -> None:
    read_end, write_end = os.pipe()
    line = b"x" * 1023 + b"\n"
    output = Output(lambda error: None, fd=write_end, limit=64 * 1024)
    try:
        for _ in range(512):  # 512 KiB: the pipe (64 KiB) is full, the rest is queued
            output.write(line)
        drain = asyncio.ensure_future(output.drain())
        done, _ = await asyncio.wait({drain}, timeout=0.5)
        assert not done  # nobody reads: the writer waits, while the loop goes on
        received = await asyncio.to_thread(read_exactly, read_end, 512 * len(line))
        await asyncio.wait_for(drain, 10)
        await asyncio.wait_for(output.flush(), 10)
        assert received == line * 512  # whole lines, in order
        assert output.queued == 0
    finally:
        output.close()
        os.close(read_end)
        os.close(write_end)


def read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += os.read(fd, size - len(data))
    return data


def test_a_terminal_is_read_line_by_line_and_ctrl_d_ends_the_input(spawn):
    main, terminal = pty.openpty()
    process = spawn(stdin=terminal)
    os.close(terminal)
    try:
        assert process.stdout is not None
        os.write(main, jsonl({"id": "typed", "model": "minilm", "input": "typed by hand"}))
        assert json.loads(process.stdout.readline())["id"] == "typed"  # before end of input
        os.write(main, b"\x04")  # Ctrl-D at the start of a line
        assert process.wait(timeout=30) == 0
    finally:
        os.close(main)


# --------------------------------------------------------------------------- limits and config


def test_a_line_over_max_line_size_is_an_error_and_the_next_line_still_runs(tmp_path):
    result = run(jsonl({"id": "big", "model": "minilm", "input": "word " * 400},
                       {"id": "small", "model": "minilm", "input": "fits"}),
                 "--set", 'protocols.stdin.max_line_size="1KiB"', tmp=tmp_path)
    assert result.returncode == 0
    found = by_id(objects(result.stdout))
    (big,) = found[1]  # too long to read its id: the line number stands in
    assert big["error"]["code"] == "line_too_long"
    assert "line 1" in big["error"]["message"]
    assert found["small"][0]["type"] == "done"


def test_defaults_fill_fields_a_request_leaves_out(tmp_path):
    result = run(jsonl({"id": 1, "input": "no model named"}), "--set",
                 'protocols.stdin.defaults={model="minilm", max_tokens=4}', tmp=tmp_path)
    (line,) = objects(result.stdout)
    assert line["type"] == "done"
    assert line["model"] == "minilm"


def test_text_mode_without_a_model_is_a_configuration_error(tmp_path):
    result = run(b"hello\n", *TEXT_MODE, tmp=tmp_path)
    assert result.returncode != 0
    assert "protocols.stdin.model" in result.stderr.decode()


# --------------------------------------------------------------------------- text mode


def test_text_mode_answers_each_line_on_one_line_in_input_order(tmp_path):
    prompts = b"alpha\n\nbeta\nalpha\n\xff\xfe\ngamma\n"
    result = run(prompts, *TEXT_MODE, "--set", 'protocols.stdin.model="minilm"', tmp=tmp_path)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    answers = result.stdout.decode().split("\n")
    assert answers.pop() == ""
    assert len(answers) == 6  # one line per input line
    assert answers[1] == ""  # blank in, blank out, without waiting for line 1
    assert answers[4] == ""  # a line that is not UTF-8: an empty answer ...
    assert "line 5 is not UTF-8" in result.stderr.decode()  # ... and the reason on stderr
    vectors = [json.loads(answers[n]) for n in (0, 2, 3, 5)]
    assert all(len(vector) == 384 for vector in vectors)
    assert vectors[0] == vectors[2]  # alpha, alpha
    assert vectors[0] != vectors[1]
    assert vectors[1] != vectors[3]


def test_text_mode_with_a_gguf_model_writes_its_completion_with_newlines_escaped(tmp_path):
    gemma = ["--set", 'protocols.stdin.model="gemma-3-270m"',
             "--set", "protocols.stdin.defaults={max_tokens=6, temperature=0}"]
    text = run(b"def add(a, b):\n", *TEXT_MODE, *gemma, tmp=tmp_path)
    plain = run(jsonl({"id": 1, "prompt": "def add(a, b):"}), *gemma, tmp=tmp_path)
    (done,) = objects(plain.stdout)
    assert "\n" in done["text"]  # the same greedy answer, with its newlines
    assert text.stdout.decode() == escape(done["text"]) + "\n"
    assert escape("a\\b\nc\rd") == "a\\\\b\\nc\\rd"
