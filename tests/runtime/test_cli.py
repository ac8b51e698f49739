"""`vtpu` on the command line, run as a real process: `python -m vtpu ...`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

VTPU = Path(sys.executable).with_name("vtpu")

PROGRAM = """\
# y = relu(x @ w + bias)
.tensor x f32[2,3] input
.tensor w f32[3,4] input
.tensor bias f32[4] ones
.tensor y f32[2,4] output
D.linear y, x, w, bias act=relu
C.halt
"""


def vtpu(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vtpu", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


def test_the_console_script_and_python_m_are_the_same_command() -> None:
    assert VTPU.exists()
    result = subprocess.run([str(VTPU), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("info", "agent", "bench", "asm", "disasm", "run"):
        assert command in result.stdout


def test_info_prints_the_isa_line() -> None:
    result = vtpu("info")
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("ISA") and "avx2" in line for line in result.stdout.splitlines())


def test_info_json_is_machine_readable() -> None:
    result = vtpu("info", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"]


def test_asm_and_disasm_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "prog.s"
    source.write_text(PROGRAM)
    result = vtpu("asm", str(source))
    assert result.returncode == 0, result.stderr
    binary = tmp_path / "prog.siw"
    assert binary.read_bytes()[:4] == b"SIW1"
    assert "2 words" in result.stdout

    text = vtpu("disasm", str(binary))
    assert text.returncode == 0, text.stderr
    assert "D.linear y, x, w, bias" in text.stdout
    again = tmp_path / "again.s"
    again.write_text(text.stdout)
    result = vtpu("asm", str(again), "-o", str(tmp_path / "again.siw"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "again.siw").read_bytes() == binary.read_bytes()


def test_run_binds_npy_inputs_and_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3), dtype=np.float32)
    w = rng.standard_normal((3, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    (tmp_path / "prog.s").write_text(PROGRAM)
    args = ("run", "prog.s", "--input", "x=x.npy", "--input", "w=w.npy")
    result = vtpu(*args, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    y = json.loads(result.stdout)["outputs"]["y"]
    expected = np.maximum(x @ w + 1, 0)
    np.testing.assert_allclose(np.array(y["data"]).reshape(y["shape"]), expected, rtol=1e-5)
    human = vtpu(*args, cwd=tmp_path)
    assert human.returncode == 0 and human.stdout.startswith("y: shape [2, 4] float32")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["asm", "missing.s"], ["missing.s", "no such file"]),
        (["disasm", "."], ["directory"]),
        (["asm", "bad.s"], ["bad opcode", "bad.s", "line 2", "word 0"]),
        (["asm", "nohalt.s"], ["missing halt", "word 0"]),
        (["disasm", "garbage.siw"], ["bad magic", "garbage.siw", "header"]),
        (["disasm", "short.siw"], ["truncated"]),
        (["run", "prog.s"], ["missing", "x"]),
        (["run", "prog.s", "--input", "x"], ["name=file.npy"]),
        (["run", "prog.s", "--input", "x=nothere.npy"], ["nothere.npy"]),
        (["run", "prog.s", "--input", "x=bad.s"], ["not a .npy"]),
        (["frobnicate"], ["invalid choice"]),
        (["asm"], ["required"]),
        (["agent", "--port", "99999"], ["port"]),
        (["agent", "--port", "eighty"], ["invalid int"]),
    ],
)
def test_bad_usage_and_bad_files_get_one_line_and_exit_2(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    (tmp_path / "bad.s").write_text(".tensor y f32[2] output\nD.frobnicate y\nC.halt\n")
    (tmp_path / "nohalt.s").write_text(".tensor a f32[2,2] ones\nD.gemm a, a, a\n")
    (tmp_path / "garbage.siw").write_bytes(b"\x00garbage" * 20)
    (tmp_path / "short.siw").write_bytes(b"SIW1\x01\x00")
    (tmp_path / "prog.s").write_text(PROGRAM)
    if args[0] == "agent":
        args = [*args, "--state-dir", str(tmp_path / "state")]
    assert_one_line_error(vtpu(*args, cwd=tmp_path), *needles)


def test_agent_on_a_busy_port_fails_in_one_line_and_stores_no_token(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = vtpu("agent", "--port", port, "--state-dir", str(tmp_path / "state"))
    assert_one_line_error(result, "cannot listen", port)
    assert "token" not in result.stdout
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == []  # nothing written


def test_run_with_an_input_of_the_wrong_shape_is_refused_with_its_name(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((5, 5), dtype=np.float32))
    np.save(tmp_path / "w.npy", np.zeros((3, 4), dtype=np.float32))
    (tmp_path / "prog.s").write_text(PROGRAM)
    result = vtpu("run", "prog.s", "--input", "x=x.npy", "--input", "w=w.npy", cwd=tmp_path)
    assert_one_line_error(result, "x", "shape")


def test_bench_list_and_its_bad_arguments() -> None:
    from vtpu import bench

    result = vtpu("bench", "--list")
    assert result.returncode == 0, result.stderr
    assert next(iter(bench.WORKLOADS)) in result.stdout
    result = vtpu("bench", "--only", "warp-drive")
    assert result.returncode == 2 and "warp-drive" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_adds_its_work_to_the_node_counters_of_the_state_dir(tmp_path: Path) -> None:
    from vtpu import bench

    state = tmp_path / "state"
    first = next(iter(bench.WORKLOADS))
    result = vtpu("bench", "--state-dir", str(state), "--only", first, "--size", "tiny",
                  "--repeats", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["name"] == first
    # Read in another process: attaching here would redirect this process's kernel counters.
    read = subprocess.run(
        [sys.executable, "-c", "import json, sys; from vtpu.counters import COUNTERS; "
         "COUNTERS.attach(sys.argv[1]); print(json.dumps(COUNTERS.snapshot()))",
         str(state / "counters")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    snap = json.loads(read.stdout)
    assert snap["kernel_calls"] > 0 or snap["siw_issued"] > 0 or snap["ppt_lookups"] > 0
