"""Command-line options shared by the commands: model loading, sizes, outputs, remote measurement.

Parsing only: each option becomes the value the library call takes, or a
one-line error naming the option.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from tfcompile.errors import MAX_SEED, TfcompileError
from tfcompile.workload import parse_sizes


DTYPES = {"int64": "int64", "int32": "int32", "float32": "float32", "float16": "float16", "bool": "bool"}


def parse_input_shapes(specs: tuple[str, ...]):
    import torch

    shapes, dtypes = {}, {}
    for spec in specs:
        name, eq, rest = spec.partition("=")
        dims, _, dtype = rest.partition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not eq or not name or not shape:
            raise click.BadParameter(f"{spec!r}: expected NAME=DIMxDIM[:dtype], e.g. input_ids=1x128:int64",
                                     param_hint="--input-shape")
        shapes[name] = shape
        if dtype:
            if dtype not in DTYPES:
                raise click.BadParameter(f"{spec!r}: dtype must be one of {', '.join(DTYPES)}",
                                         param_hint="--input-shape")
            dtypes[name] = getattr(torch, dtype)
    return (shapes or None), (dtypes or None)


def model_argument(fn):
    """MODEL as the first argument or as ``-m/--model`` (optimum-cli's and olive's spelling), not both."""
    @functools.wraps(fn)
    def wrapper(*args, model, model_option, **kwargs):
        if model is not None and model_option is not None:
            raise click.UsageError(f"the model is given twice ({model} and -m {model_option}): give one")
        if model is None and model_option is None:
            raise click.UsageError("missing MODEL: give it as the first argument or with -m/--model")
        return fn(*args, model=model if model is not None else model_option, **kwargs)

    wrapper = click.option("-m", "--model", "model_option", default=None, metavar="MODEL",
                           help="The model, as MODEL (either spelling).")(wrapper)
    return click.argument("model", required=False)(wrapper)


def model_options(fn):
    options = [
        click.option("--batch", default="1", show_default=True, metavar="SIZES",
                     help="Batch size of the example inputs; for optimize also a list or range of a workload "
                          "(1,8 or 1..32)."),
        click.option("--seq", default="128", show_default=True, metavar="LENGTHS",
                     help="Sequence length of token inputs; for optimize also a list or range of a workload "
                          "(16..512: powers of two between, both ends kept)."),
        click.option("--input-shape", "input_shape", multiple=True, metavar="NAME=DIMS[:DTYPE]",
                     help="Explicit input shape, e.g. input_ids=1x128:int64 (repeatable)."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow unpickling a full torch.save'd module or pickled archive members "
                          "(runs code from the file: only for files you trust)."),
        click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     help="Hugging Face config.json for a bare state dict or safetensors file."),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEED),
                     help="Seed for weights and inputs."),
        click.option("--timeout", "load_timeout", default=600.0, show_default=True,
                     type=click.FloatRange(min=0, min_open=True),
                     help="Seconds loading and tracing the model may take."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def parse_one_size(text: str, option: str) -> int:
    values = parse_sizes(text, option)
    if len(values) > 1:
        raise TfcompileError(f"{option} {text}: this command traces one shape; a list or range describes a "
                             "workload for `optimize`")
    return values[0]


def load_options(batch, seq, input_shape, trust_pickle, config_path, seed, load_timeout):
    """Load options for one traced shape (``batch`` and ``seq`` still as typed)."""
    from tfcompile.frontend import LoadOptions

    shapes, dtypes = parse_input_shapes(input_shape)
    return LoadOptions(batch=parse_one_size(batch, "--batch"), seq=parse_one_size(seq, "--seq"), input_shapes=shapes,
                       input_dtypes=dtypes,
                       trust_pickle=trust_pickle, config=config_path, seed=seed, timeout_s=load_timeout)


def load_graph(model, **load_kwargs):
    from tfcompile.frontend import load_model

    return load_model(model, load_options(**load_kwargs))


def file_output(_ctx, param, text: str | None) -> Path | None:
    """-o for a file, checked before any work: `out/dir/` would become a file named `dir`, or fail late."""
    from tfcompile.outputs import check_output_file

    return None if text is None else check_output_file(text)


def directory_output(_ctx, param, text: str) -> Path:
    """-o for a directory: '' would silently mean the current directory."""
    if not text.strip():
        raise TfcompileError("-o '': name the directory for the outputs (e.g. -o out)")
    return Path(text)


def generation_options(fn):
    """--generate/--prompt-len/--new-tokens: optimize a causal LM's generation loop (prefill + decode steps)."""
    fn = click.option("--new-tokens", "new_tokens", default=64, show_default=True, type=click.IntRange(2, 1 << 20),
                      help="With --generate: tokens generated per prompt (the first by the prefill).")(fn)
    fn = click.option("--prompt-len", "prompt_len", default=128, show_default=True, type=click.IntRange(1, 1 << 20),
                      help="With --generate: prompt tokens per sequence.")(fn)
    return click.option("--generate", is_flag=True,
                        help="Optimize a causal LM for generation with a KV cache: rank variants by time to first "
                             "token + per-token time, write prefill.onnx and decode.onnx.")(fn)


# Options of `optimize` that describe one forward pass and mean nothing for --generate.
NOT_FOR_GENERATION = ("passes", "allow_approx", "lengths", "lengths_file", "calibration_data", "quantize", "remote",
                      "device_file", "time_budget_s", "explain", "seq", "input_shape", "device", "mode", "precision")


def check_generation_options(generate: bool) -> None:
    """Refuse --prompt-len/--new-tokens without --generate, and one-pass options with it."""
    context = click.get_current_context()
    given = [p for p in context.command.params
             if context.get_parameter_source(p.name) not in (click.core.ParameterSource.DEFAULT, None)]
    if not generate:
        stray = [p.opts[0] for p in given if p.name in ("prompt_len", "new_tokens")]
        if stray:
            raise TfcompileError(f"{stray[0]} describes a generation loop: give --generate too")
        return
    clash = [p.opts[0] for p in given if p.name in NOT_FOR_GENERATION]
    if clash:
        raise TfcompileError(f"{clash[0]} does not apply to --generate (a prompt of --prompt-len tokens, "
                             "--new-tokens tokens, exact passes on the prefill and decode-step graphs)")


def remote_options(fn):
    """--remote/--device-key: measure on another machine through a TVM RPC tracker."""
    fn = click.option("--device-key", "device_key", default=None, metavar="KEY",
                      help="Key the device's TVM RPC servers registered with (with --remote).")(fn)
    return click.option("--remote", default=None, metavar="HOST:PORT",
                        help="Measure with TVM on the device behind this TVM RPC tracker (implies --backend tvm; "
                             "variants are timed in parallel over the servers with --device-key).")(fn)


def parse_remote(remote, device_key, backend):
    """(RemoteSpec or None, backend): --remote measures with TVM, whatever --backend defaults to."""
    if remote is None:
        if device_key:
            raise TfcompileError("--device-key needs --remote HOST:PORT (the TVM RPC tracker)")
        return None, backend
    explicit = click.get_current_context().get_parameter_source("backend") != click.core.ParameterSource.DEFAULT
    if explicit and backend != "tvm":
        raise TfcompileError(f"--remote measures with TVM on the device; it cannot be combined with --backend "
                             f"{backend}")
    from tfcompile.backends.tvm.remote import RemoteSpec

    return RemoteSpec.parse(remote, device_key), "tvm"


# How torch runs the variants (backends/torch_device.py; spelled here so --help needs no torch import).
TORCH_DEVICES, TORCH_MODES, TORCH_PRECISIONS = ("cpu", "cuda"), ("eager", "graphs", "compile"), \
    ("fp32", "tf32", "bf16", "fp16")


def device_options(fn):
    """--device/--mode/--precision (with --backend torch), passed on as ``torch_options``: ``{}`` for
    cpu/eager/fp32 (the GraphModule as it is), else the three, checked before any work."""
    @functools.wraps(fn)
    def wrapper(*args, device, mode, precision, **kwargs):
        torch_options = parse_device_options(kwargs.get("backend"), kwargs.get("remote"), kwargs.get("target"),
                                             device=device, mode=mode, precision=precision)
        return fn(*args, torch_options=torch_options, **kwargs)

    wrapper = click.option("--precision", type=click.Choice(TORCH_PRECISIONS), default="fp32", show_default=True,
                           help="With --backend torch: fp32 (TF32 off), tf32 (cuda), bf16 or fp16 (parameters and "
                                "inputs cast; outputs checked at that precision's tolerance).")(wrapper)
    wrapper = click.option("--mode", type=click.Choice(TORCH_MODES), default="eager", show_default=True,
                           help="With --backend torch: eager, graphs (CUDA-graph replay, cuda only) or compile "
                                "(torch.compile).")(wrapper)
    return click.option("--device", type=click.Choice(TORCH_DEVICES), default="cpu", show_default=True,
                        help="With --backend torch: where torch runs the variants (cuda needs a GPU --target, "
                             "e.g. h100).")(wrapper)


def parse_device_options(backend, remote, target, **options: str) -> dict[str, str]:
    """``{}`` or {"device", "mode", "precision"}; refuses them without --backend torch or where they cannot run."""
    context = click.get_current_context()
    given = [f"--{name} {value}" for name, value in options.items()
             if context.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)]
    if given and (remote is not None or backend != "torch"):
        raise TfcompileError(f"{given[0]} says how torch runs the variants: it needs --backend torch, not "
                             f"{'--remote' if remote is not None else f'--backend {backend}'}")
    if options == {"device": "cpu", "mode": "eager", "precision": "fp32"}:
        return {}
    from tfcompile.backends.torch_device import check_request

    check_request(**options)
    if options["device"] == "cuda":
        from tfcompile.cost_models import load_device

        if load_device(target).kind != "gpu":
            raise TfcompileError(f"--device cuda measures a GPU: give its --target (e.g. h100), not {target}")
    return options


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]  # "1,,2" is a typo, not two values
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter(f"{text!r}: expected positive integers separated by commas", param_hint=option)
    return values


# A run file is a few dozen lines of options; a larger one is not a run file and is not read into memory.
MAX_RUN_CONFIG_BYTES = 1 << 20


def run_config_defaults(path: Path, commands: dict[str, click.Command]) -> dict[str, dict]:
    """A TOML run file (``[optimize]`` with ``target = "cpu"``, ``allow-approx = true`` ...) as click's
    ``default_map``: each table names a command, each key one of its options (as spelled on the command line,
    without the dashes) or ``model``. The command line still wins over the file."""
    import tomllib

    try:
        if not path.is_file():
            raise TfcompileError(f"--run-config {path}: not a file")
        size = path.stat().st_size
        if size > MAX_RUN_CONFIG_BYTES:
            raise TfcompileError(f"--run-config {path}: {size} bytes is too large for a run file (at most "
                                 f"{MAX_RUN_CONFIG_BYTES} bytes)")
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise TfcompileError(f"--run-config {path}: cannot read it: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TfcompileError(f"--run-config {path}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TfcompileError(f"--run-config {path}: not TOML: {exc}") from exc
    defaults: dict[str, dict] = {}
    for command_name, table in data.items():
        command = commands.get(command_name)
        if command is None or not isinstance(table, dict):
            raise TfcompileError(f"--run-config {path}: [{command_name}] is not a command's table (commands: "
                                 f"{', '.join(sorted(commands))})")
        by_key = {}
        for param in command.params:
            for flag in param.opts + param.secondary_opts:
                if flag.startswith("--"):
                    by_key[flag[2:]] = param
                    by_key[flag[2:].replace("-", "_")] = param
        # ``model`` fills the MODEL argument (not -m), so a model on the command line replaces the file's.
        by_key.update({param.name: param for param in command.params if isinstance(param, click.Argument)})
        values = {}
        for key, value in table.items():
            param = by_key.get(key)
            if param is None:
                raise TfcompileError(f"--run-config {path}: [{command_name}] has no option {key!r}")
            if isinstance(value, dict) or (isinstance(value, list) and not all(
                    isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)):
                raise TfcompileError(f"--run-config {path}: [{command_name}] {key}: a string, number, true/false "
                                     "or a list of strings or numbers")
            if isinstance(value, list) and not getattr(param, "multiple", False):
                value = ",".join(str(v) for v in value)  # batch = [1, 8] reads as --batch 1,8
            values[param.name] = value
        defaults[command_name] = values
    return defaults
