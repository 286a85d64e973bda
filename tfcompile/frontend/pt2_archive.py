"""Reading torch.export archives (.pt2) so that nothing in the file runs code.

``torch.export.load`` trusts its file. In torch 2.13 it
- unpickles the stored sample inputs (``data/sample_inputs/*.pt``), legacy
  weight and constant files, and any weight or constant whose payload config
  says ``use_pickle``: the sample inputs fall back to the unrestricted
  unpickler when the restricted one refuses, the others use it outright;
- unpickles "opaque" constants with ``pickle.loads`` and custom objects with
  TorchScript's unpickler, and loads AOTInductor members as shared libraries;
- evaluates shape expressions (``expr_str``) with ``sympy.sympify``, an eval;
- writes node and input names from the graph JSON into Python source that
  ``torch.fx`` execs, and turns ``guards_code`` into Python source as well.

So tfcompile opens the archive itself and hands torch a rewritten copy that
holds only what passed a check, member by member:
- a pickled member is loaded with torch's weights_only unpickler and written
  back with ``torch.save``, so torch only ever unpickles bytes tfcompile wrote
  from tensors and containers; one that names anything else is refused with
  ``UntrustedPickleError`` unless the user passes ``--trust-pickle``;
- members holding Python objects or native code are refused;
- the graph JSON's names, targets and shape expressions must look like what
  torch writes (identifiers, dotted names, sympy constructors); its
  ``guards_code`` and stack traces are dropped;
and after loading, every operator the graph calls must be a torch operator
that does not read or write files.
"""

from __future__ import annotations

import contextlib
import io
import json
import keyword
import operator
import re
import types
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

from tfcompile.errors import ModelLoadError, UntrustedPickleError, first_line
from tfcompile.frontend.limits import check_fits_in_memory, human_bytes, memory_budget_bytes, quiet_library_logs

TRUST_FLAG = "--trust-pickle"
PICKLE_PROTOCOL_BYTE = 0x80

# What tfcompile's rewritten archive is called inside (torch reads any one folder name).
REWRITTEN_ROOT = "archive"

METADATA_MEMBERS = frozenset({"archive_format", "archive_version", "byteorder", ".data/version",
                              ".data/serialization_id"})
MODEL_JSON = re.compile(r"models/(?P<model>\w+)\.json")
PAYLOAD_CONFIG = re.compile(r"data/(?P<kind>weights|constants)/(?P<model>\w+)_(?P=kind)_config\.json")
PAYLOAD = re.compile(r"data/(?P<kind>weights|constants)/(?P<file>\w+(?:\.pt)?)")
SAMPLE_INPUTS = re.compile(r"data/sample_inputs/(?P<model>\w+)\.pt")
EXTRA = re.compile(r"extra/[\w.\-/]+")
# Members torch loads as compiled native code (AOTInductor, ExecuTorch, MTIA) or as
# extra weight stores; tfcompile reads exported programs only.
NATIVE_CODE_PREFIXES = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
# Constants stored as Python objects rather than tensors (see torch/export/pt2_archive/constants.py).
OBJECT_PAYLOAD_PREFIXES = ("custom_obj_", "opaque_obj_")

# Keys of the graph JSON whose values are free text that torch keeps as metadata
# and never turns into code (``as_string`` arguments are written with repr()).
FREE_TEXT_KEYS = frozenset({"metadata", "as_string", "as_strings", "in_spec", "out_spec", "torch_version"})
# Dicts whose keys are free text (keyword names of a dict argument) but whose values are checked.
FREE_TEXT_KEY_DICTS = frozenset({"as_string_to_argument"})
# Dicts keyed by shape expressions (torch only looks them up, but they must still be expressions).
EXPRESSION_KEY_DICTS = frozenset({"range_constraints"})
# Keys whose values become Python variable names in the code torch.fx generates.
IDENTIFIER_KEYS = frozenset({"name", "as_name", "forward_arg_names", "user_input_name", "field_names"})
SAFE_NAME = re.compile(r"[\w.@]*", re.ASCII)

# sympy's srepr() constructors, torch's sympy functions and their keyword arguments: the
# only names a shape expression may use, so that sympify's eval cannot reach anything else.
SYMPY_NAMES = frozenset("""
    Symbol Dummy Integer Rational Float Mul Add Pow Mod Max Min Abs floor ceiling sqrt
    Eq Ne Lt Le Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan GreaterThan
    And Or Not Xor Piecewise ExprCondPair Tuple true false BooleanTrue BooleanFalse
    One Zero NegativeOne Half Infinity NegativeInfinity oo zoo nan IntInfinity NegativeIntInfinity int_oo
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift
    PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat
    TruncToInt RoundToInt RoundDecimal ToFloat Identity OpaqueUnaryFn_sqrt
    positive negative nonnegative nonpositive integer real finite zero nonzero commutative
    even odd prime precision evaluate True False None
""".split())
SYMPY_TOKEN = re.compile(r"""\s+|(?P<name>[A-Za-z_]\w*)|'[\w.+\-]*'|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?
                             |\*\*|//|==|!=|<=|>=|[-+*/%(),=<>]""", re.VERBOSE | re.ASCII)
BARE_SYMBOL = re.compile(r"[a-z]+\d+", re.ASCII)  # s0, u3: str()-style expressions of older archives

# Namespaces of operators an exported transformer calls; aten ops that touch files are refused.
OPERATOR_NAMESPACES = frozenset({"aten", "prims"})
FILE_OPERATORS = frozenset({"aten::save", "aten::from_file"})


def load_exported_program(path: Path, *, trust_pickle: bool) -> torch.export.ExportedProgram:
    with _open_zip(path) as archive:
        root, infos = _members(path, archive)
        _check_declared_size(path, infos)
        plan = _read_plan(path, archive, root, infos)
        rewritten = _rewrite(path, archive, root, infos, plan, trust_pickle=trust_pickle)
    program = _torch_load(path, rewritten)
    check_operators(path, program)
    _check_tensor_sizes(path, program)
    return program


# --- reading the archive ------------------------------------------------------------------------

@contextlib.contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise ModelLoadError(f"{path}: truncated or corrupt zip archive ({first_line(exc)})") from exc
    with archive:
        yield archive


def _members(path: Path, archive: zipfile.ZipFile) -> tuple[str, list[zipfile.ZipInfo]]:
    """The archive's root folder and its files; torch reads only archives with one root folder."""
    infos = [info for info in archive.infolist() if not info.is_dir()]
    if not infos:
        raise ModelLoadError(f"{path}: an empty zip archive, not a torch.export archive")
    root = infos[0].filename.split("/", 1)[0]
    seen = set()
    for info in infos:
        if not info.filename.startswith(root + "/"):
            raise ModelLoadError(f"{path}: archive member {info.filename} lies outside the archive's folder "
                                 f"{root}/; not an archive torch.export.save wrote")
        if info.filename in seen:
            raise ModelLoadError(f"{path}: archive member {info.filename} appears twice; not an archive "
                                 "torch.export.save wrote")
        seen.add(info.filename)
    return root, infos


def _check_declared_size(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    declared = sum(info.file_size for info in infos)
    if declared > memory_budget_bytes():
        raise ModelLoadError(f"{path}: the archive unpacks to {human_bytes(declared)}, more than this machine's "
                             "available memory; not a model tfcompile can load here")


def _relative(root: str, info: zipfile.ZipInfo) -> str:
    return info.filename[len(root) + 1:]


def _read(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError,
            ValueError) as exc:
        # A failed CRC, a cut-off member, an encrypted member, an unknown compression, a name not in UTF-8.
        raise ModelLoadError(f"{path}: truncated or corrupt zip archive (member {info.filename}: "
                             f"{first_line(exc)})") from exc


def _read_json(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    try:
        return json.loads(_read(path, archive, info))
    except RecursionError as exc:  # [[[[...]]]] nested deeper than any real archive's JSON
        raise ModelLoadError(f"{path}: archive member {info.filename} nests its JSON too deeply to be a "
                             "torch.export archive") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: archive member {info.filename} is not valid JSON ({first_line(exc)})") from exc


# --- what torch will do with each member ----------------------------------------------------------

class _Plan:
    """What torch would do with each payload: read raw bytes, unpickle, or build an object."""

    def __init__(self) -> None:
        self.pickled: set[str] = set()   # relative member names torch unpickles
        self.objects: set[str] = set()   # relative member names torch turns into Python objects
        self.raw: dict[str, int] = {}    # relative member name -> elements of the largest tensor it holds


def _read_plan(path: Path, archive: zipfile.ZipFile, root: str, infos: list[zipfile.ZipInfo]) -> _Plan:
    plan = _Plan()
    names = {_relative(root, info) for info in infos}
    if "archive_format" not in names:
        legacy = " (an older torch.export format: load and re-save it with this torch)" \
            if "serialized_exported_program.json" in names else ""
        raise ModelLoadError(f"{path}: no archive_format member; not a torch.export archive{legacy}")
    for info in infos:
        name = _relative(root, info)
        if match := MODEL_JSON.fullmatch(name):
            plan.pickled.add(f"data/sample_inputs/{match['model']}.pt")
            # Archives from before payload configs keep all weights (constants) in one pickle.
            plan.pickled.add(f"data/weights/{match['model']}.pt")
            plan.pickled.add(f"data/constants/{match['model']}.pt")
        elif match := PAYLOAD_CONFIG.fullmatch(name):
            _plan_payloads(path, info.filename, match["kind"], _read_json(path, archive, info), plan)
    return plan


def _plan_payloads(path: Path, member: str, kind: str, document: Any, plan: _Plan) -> None:
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: archive member {member} has no payload config")
    for fqn, meta in config.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise ModelLoadError(f"{path}: archive member {member}: entry {fqn!r} has no path_name")
        if not SAFE_NAME.fullmatch(fqn) or not re.fullmatch(r"\w+", meta["path_name"], re.ASCII):
            raise ModelLoadError(f"{path}: archive member {member}: entry {fqn!r} names "
                                 f"{meta['path_name']!r}, not a payload torch.export.save writes")
        payload = f"data/{kind}/{meta['path_name']}"
        if meta["path_name"].startswith(OBJECT_PAYLOAD_PREFIXES):
            plan.objects.add(payload)
        elif meta.get("use_pickle"):
            plan.pickled.add(payload)
        else:
            plan.raw[payload] = max(plan.raw.get(payload, 0), _declared_elements(path, member, fqn, meta))


def _declared_elements(path: Path, member: str, fqn: str, meta: dict) -> int:
    """Elements of a raw payload's tensor; torch allocates them when the record is empty."""
    tensor_meta = meta.get("tensor_meta") or {}
    sizes = tensor_meta.get("sizes") or []
    dims = [size.get("as_int") if isinstance(size, dict) else None for size in sizes]
    if any(not isinstance(d, int) or d < 0 for d in dims):
        raise ModelLoadError(f"{path}: archive member {member}: entry {fqn!r} has sizes {sizes!r}, "
                             "not non-negative integers")
    numel = 1
    for d in dims:
        numel *= d
    return numel


# --- writing the checked copy ---------------------------------------------------------------------

def _rewrite(path: Path, archive: zipfile.ZipFile, root: str, infos: list[zipfile.ZipInfo], plan: _Plan, *,
             trust_pickle: bool) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as out:
        for info in infos:
            name = _relative(root, info)
            data = _checked_member(path, archive, info, name, plan, trust_pickle=trust_pickle)
            if data is not None:
                out.writestr(f"{REWRITTEN_ROOT}/{name}", data)
    buffer.seek(0)
    return buffer


def _checked_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, plan: _Plan, *,
                    trust_pickle: bool) -> bytes | None:
    """The bytes torch may read for this member, or None to leave it out."""
    if name.startswith(NATIVE_CODE_PREFIXES):
        raise ModelLoadError(f"{path}: archive member {info.filename} holds compiled native code "
                             "(AOTInductor/ExecuTorch), which tfcompile never loads; save the model with "
                             "torch.export.save only")
    if name in METADATA_MEMBERS:
        return _checked_metadata(path, info, _read(path, archive, info))
    if MODEL_JSON.fullmatch(name):
        return _checked_model_json(path, info.filename, _read_json(path, archive, info))
    if PAYLOAD_CONFIG.fullmatch(name):
        return _read(path, archive, info)
    if EXTRA.fullmatch(name):
        return _refuse_if_pickled(path, info, _read(path, archive, info), trust_pickle=trust_pickle)
    if name in plan.objects:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path}: archive member {info.filename} is a pickled Python object (a custom or opaque "
                f"constant); unpickling runs code from the file, so tfcompile loads it only with {TRUST_FLAG}")
        return _read(path, archive, info)
    if name in plan.pickled:
        data = _read(path, archive, info)
        return data if trust_pickle else _restricted_repickle(path, info.filename, data)
    if name in plan.raw:
        _check_raw_payload(path, info, plan.raw[name])
        return _read(path, archive, info)
    if SAMPLE_INPUTS.fullmatch(name) or PAYLOAD.fullmatch(name):
        # No model or config refers to it, so torch would not read it; a pickle here is still refused
        # (torch.export.save never writes one), and anything else is left out of the copy.
        _refuse_if_pickled(path, info, _read(path, archive, info), trust_pickle=trust_pickle)
        return None
    raise ModelLoadError(f"{path}: archive member {info.filename} is not part of a torch.export archive "
                         "(tfcompile reads only what torch.export.save writes)")


def _refuse_if_pickled(path: Path, info: zipfile.ZipInfo, data: bytes, *, trust_pickle: bool) -> bytes:
    if trust_pickle or not looks_pickled(info.filename, data):
        return data
    raise UntrustedPickleError(f"{path}: archive member {info.filename} is a pickle; unpickling runs code from the "
                               f"file, so tfcompile loads it only with {TRUST_FLAG}")


def looks_pickled(name: str, data: bytes) -> bool:
    """A pickle by name or first byte, or a zip inside the archive (torch.save's format holds data.pkl)."""
    return name.endswith((".pkl", ".pickle")) or data[:1] == bytes([PICKLE_PROTOCOL_BYTE]) or data[:2] == b"PK"


def _checked_metadata(path: Path, info: zipfile.ZipInfo, data: bytes) -> bytes:
    if not re.fullmatch(rb"[\w.\-\n]{0,64}", data):
        raise ModelLoadError(f"{path}: archive member {info.filename} is not a version or format tag")
    return data


def _check_raw_payload(path: Path, info: zipfile.ZipInfo, declared_elements: int) -> None:
    # torch allocates an empty record's tensor from the declared sizes alone.
    if info.file_size == 0 and declared_elements > 0:
        check_fits_in_memory(declared_elements, f"{path}: archive member {info.filename} (an empty record)",
                             "the archive is damaged or crafted; re-save the model with torch.export.save")


def _restricted_repickle(path: Path, member: str, data: bytes) -> bytes:
    """Load a pickled member with torch's weights_only unpickler and pickle the result anew.

    torch.export.load unpickles some members with the unrestricted unpickler; after
    this it only ever sees a pickle tfcompile wrote from tensors and containers.
    """
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a forbidden global; anything else for garbage
        raise UntrustedPickleError(
            f"{path}: archive member {member} is a pickle that the restricted (weights-only) unpickler "
            f"refuses ({refusal_reason(exc)}); unpickling it fully would run code from the file, so tfcompile "
            f"loads it only with {TRUST_FLAG}") from exc
    buffer = io.BytesIO()
    torch.save(loaded, buffer)
    return buffer.getvalue()


def refusal_reason(exc: Exception) -> str:
    """torch's refusal is a page of advice; the name it refused, or the bad opcode, is the point."""
    text = str(exc)
    if match := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
        return f"it names {match[1]}"
    if match := re.search(r"WeightsUnpickler error:\s*([^\n]+)", text):
        return match[1].strip().rstrip(".")
    return f"{type(exc).__name__}: {first_line(exc)}"


# --- the graph JSON -------------------------------------------------------------------------------

def _checked_model_json(path: Path, member: str, document: Any) -> bytes:
    if not isinstance(document, dict):
        raise ModelLoadError(f"{path}: archive member {member} is not an exported program")
    # Guards are Python source torch compiles for program.module(); tfcompile checks shapes itself.
    if "guards_code" in document:
        document["guards_code"] = []
    _drop_stack_traces(document)
    _check_json_strings(path, member, document, key=None)
    return json.dumps(document).encode()


def _drop_stack_traces(value: Any) -> None:
    """Stack traces end up as comments in generated code; nothing in tfcompile reads them."""
    if isinstance(value, dict):
        metadata = value.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop("stack_trace", None)
        for child in value.values():
            _drop_stack_traces(child)
    elif isinstance(value, list):
        for child in value:
            _drop_stack_traces(child)


def _check_json_strings(path: Path, member: str, value: Any, key: str | None) -> None:
    if key == "expr_str":
        _check_shape_expression(path, member, value)
        return
    if key in FREE_TEXT_KEYS:
        return
    if isinstance(value, dict):
        for child_key, child in value.items():
            if key in EXPRESSION_KEY_DICTS:
                _check_shape_expression(path, member, child_key)
            elif key not in FREE_TEXT_KEY_DICTS:
                _check_name(path, member, child_key, key, as_identifier=False)
            _check_json_strings(path, member, child, child_key)
    elif isinstance(value, list):
        for child in value:
            _check_json_strings(path, member, child, key)
    elif isinstance(value, str):
        _check_name(path, member, value, key, as_identifier=key in IDENTIFIER_KEYS)


def _check_name(path: Path, member: str, text: str, key: str | None, *, as_identifier: bool) -> None:
    if as_identifier:
        # Empty: the positional arguments of higher-order operators (torch.cond) have no name.
        ok = text == "" or (text.isidentifier() and text.isascii() and not keyword.iskeyword(text))
    else:
        ok = SAFE_NAME.fullmatch(text) is not None
    if not ok:
        raise ModelLoadError(f"{path}: archive member {member} has {key or 'a key'} {_clip(text)!r}, not a name "
                             "torch.export writes; the archive is damaged or crafted")


def _check_shape_expression(path: Path, member: str, expr: Any) -> None:
    """Shape expressions go to sympy.sympify, an eval: allow sympy constructors and literals only."""
    if not isinstance(expr, str):
        raise ModelLoadError(f"{path}: archive member {member} has a shape expression that is not a string")
    position = 0
    while position < len(expr):
        token = SYMPY_TOKEN.match(expr, position)
        name = token["name"] if token else None
        if token is None or (name and name not in SYMPY_NAMES and not BARE_SYMBOL.fullmatch(name)):
            raise ModelLoadError(f"{path}: archive member {member} has shape expression {_clip(expr)!r}, which "
                                 "is not a sympy expression torch.export writes; the archive is damaged or crafted")
        position = token.end()


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# --- loading and checking what torch built ---------------------------------------------------------

def _torch_load(path: Path, rewritten: io.BytesIO) -> torch.export.ExportedProgram:
    try:
        with quiet_library_logs():
            return torch.export.load(rewritten)
    except KeyError as exc:
        raise ModelLoadError(f"{path}: the archive holds no exported program named {first_line(exc)} "
                             "(torch.export.save writes one named 'model')") from exc
    except Exception as exc:  # every member was checked; what torch still refuses is a damaged archive
        raise ModelLoadError(f"{path}: unreadable torch.export archive: {type(exc).__name__}: "
                             f"{first_line(exc)}") from exc


def _symbolic_operators() -> frozenset:
    from torch._export.serde.serialize import _SYM_OPS

    return frozenset(_SYM_OPS) | {operator.getitem}


def check_operators(path: Path, program: torch.export.ExportedProgram) -> None:
    """Every callable in the graph (targets and operator arguments) must be a torch operator without file I/O."""
    allowed_functions = _symbolic_operators()
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op == "call_function":
                _check_callable(path, node.target, allowed_functions)
            elif node.op in ("call_method", "call_module"):
                raise ModelLoadError(f"{path}: the graph has a {node.op} node ({node.target}); an exported "
                                     "program calls operators only; the archive is damaged or crafted")
            for arg in _flat_args(node):
                if isinstance(arg, (torch._ops.OperatorBase, types.FunctionType, types.BuiltinFunctionType,
                                    types.MethodType, type)):
                    _check_callable(path, arg, allowed_functions)


def _flat_args(node: torch.fx.Node) -> list[Any]:
    flat: list[Any] = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), lambda a: flat.append(a) or a)
    return flat


def _check_callable(path: Path, target: Any, allowed_functions: frozenset) -> None:
    if isinstance(target, torch._ops.HigherOrderOperator):
        return
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        schema_name = target._schema.name if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
        namespace = schema_name.split("::", 1)[0]
        if namespace in OPERATOR_NAMESPACES and schema_name not in FILE_OPERATORS:
            return
        why = "it reads or writes files" if schema_name in FILE_OPERATORS else "not an aten or prims operator"
        raise ModelLoadError(f"{path}: the graph calls {schema_name}, which tfcompile does not run ({why})")
    try:
        if target in allowed_functions:
            return
    except TypeError:  # unhashable
        pass
    name = getattr(target, "__qualname__", None) or type(target).__name__
    module = getattr(target, "__module__", "") or ""
    raise ModelLoadError(f"{path}: the graph calls {module + '.' if module else ''}{name}, which is not a torch "
                         "operator; tfcompile does not run it (the archive is damaged or crafted)")


def _check_tensor_sizes(path: Path, program: torch.export.ExportedProgram) -> None:
    """A zero-stride view can claim terabytes over a few bytes; the first copy would try to allocate them."""
    tensors = list(program.state_dict.values()) + [c for c in program.constants.values()
                                                   if isinstance(c, torch.Tensor)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    check_fits_in_memory(total, f"{path}: the archive's weights", "the archive is damaged or crafted, or the "
                         "model is too large for this machine")
