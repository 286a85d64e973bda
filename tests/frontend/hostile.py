"""Hostile and broken model files, generated on the spot (no binaries are checked in).

Every payload here, if it ran, would create a marker file; the tests assert that
it never appears. ``pt2_cases`` rewrite a clean torch.export archive member by
member: each names the way torch.export.load (2.13) would run code from it.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch


class WritesMarker:
    """Unpickling this creates ``marker``: the proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(WritesMarker(marker), protocol=2)


def torch_save_payload(marker: Path) -> bytes:
    """A torch.save zip whose data.pkl is the payload (what a stored sample input looks like)."""
    clean = io.BytesIO()
    torch.save((torch.ones(2),), clean)
    return replace_members(clean.getvalue(), lambda name: name.endswith("/data.pkl"),
                           lambda _data: pickle_payload(marker))


def replace_members(archive: bytes, selects: Callable[[str], bool], make: Callable[[bytes], bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, make(data) if selects(info.filename) else data)
    return out.getvalue()


class TinyNet(torch.nn.Module):
    """A weight, a buffer and a tensor constant: each is its own archive member."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.offset = torch.ones(4)

    def forward(self, x):
        return torch.relu(self.fc(x) * self.scale + self.offset)


def save_clean_pt2(path: Path, *, dynamic: bool = False) -> Path:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    shapes = ({0: torch.export.Dim("batch", min=2, max=64)},) if dynamic else None
    torch.export.save(torch.export.export(TinyNet(), (x,), dynamic_shapes=shapes), str(path))
    return path


class Pt2Edit:
    """Member-level edits of a torch.export archive: replace, add, or rewrite a JSON member."""

    def __init__(self, replace=None, add=None, json_edits=None):
        self.replace = replace or {}
        self.add = add or {}
        self.json_edits = json_edits or {}

    def apply(self, src: Path, dst: Path) -> Path:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
            root = zin.namelist()[0].split("/", 1)[0]
            for info in zin.infolist():
                name = info.filename[len(root) + 1:]
                data = zin.read(info)
                if name in self.json_edits:
                    document = json.loads(data)
                    self.json_edits[name](document)
                    data = json.dumps(document).encode()
                zout.writestr(info.filename, self.replace.get(name, data))
            for name, data in self.add.items():
                zout.writestr(f"{root}/{name}", data)
        return dst


WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
MODEL_JSON = "models/model.json"


def _payload_entry(config_name: str, path_name: str | None = None, use_pickle: bool = True):
    def edit(document):
        entry = next(iter(document["config"].values()))
        entry["use_pickle"] = use_pickle
        if path_name:
            entry["path_name"] = path_name
    return {config_name: edit}


def _first_expression(code: str):
    def edit(document):
        sizes = document["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0] = {"as_expr": {"expr_str": code, "hint": {"as_int": 3}}}
    return {MODEL_JSON: edit}


def _rename_input(new_name: str):
    def edit(document):
        text = json.dumps(document).replace('"x"', json.dumps(new_name))
        document.clear()
        document.update(json.loads(text))
    return {MODEL_JSON: edit}


def _extra_node(target: str, inputs: list, outputs: list):
    """Insert a node before the graph's first node; it runs whenever the graph runs."""
    def edit(document):
        document["graph_module"]["graph"]["nodes"].insert(0, {
            "target": target, "inputs": inputs, "outputs": outputs, "metadata": {},
            "is_hop_single_tensor_return": None, "name": "injected"})
    return {MODEL_JSON: edit}


def pt2_cases(marker: Path) -> dict[str, Pt2Edit]:
    """Name -> edit putting a payload into one kind of member torch.export.load reads."""
    payload = pickle_payload(marker)
    return {
        "sample-inputs-raw-pickle": Pt2Edit(replace={"data/sample_inputs/model.pt": payload}),
        "sample-inputs-torch-save-zip": Pt2Edit(replace={"data/sample_inputs/model.pt": torch_save_payload(marker)}),
        "weight-marked-use-pickle": Pt2Edit(replace={"data/weights/weight_0": payload},
                                            json_edits=_payload_entry(WEIGHTS_CONFIG)),
        "constant-marked-use-pickle": Pt2Edit(replace={"data/constants/tensor_0": payload},
                                              json_edits=_payload_entry(CONSTANTS_CONFIG)),
        "opaque-object-constant": Pt2Edit(add={"data/constants/opaque_obj_0": payload},
                                          json_edits=_payload_entry(CONSTANTS_CONFIG, "opaque_obj_0")),
        "custom-object-constant": Pt2Edit(add={"data/constants/custom_obj_0": payload},
                                          json_edits=_payload_entry(CONSTANTS_CONFIG, "custom_obj_0")),
        "legacy-weights-file": Pt2Edit(add={"data/weights/model.pt": payload}),
        "legacy-constants-file": Pt2Edit(add={"data/constants/model.pt": torch_save_payload(marker)}),
        "unreferenced-payload-member": Pt2Edit(add={"data/weights/weight_99": payload}),
        "pickle-in-extra-files": Pt2Edit(add={"extra/notes.pkl": payload}),
        "shape-expression-eval": Pt2Edit(json_edits=_first_expression(
            f"__import__('builtins').open({str(marker)!r}, 'w')")),
        "input-name-into-generated-code": Pt2Edit(json_edits=_rename_input(f"x=open({str(marker)!r},'w')")),
        "python-function-as-operator": Pt2Edit(json_edits=_extra_node(
            "torch.os.system", [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
            [{"as_none": True}])),
        "file-writing-aten-operator": Pt2Edit(json_edits=_extra_node(
            "torch.ops.aten.save.default",
            [{"name": "item", "arg": {"as_tensor": {"name": "x"}}, "kind": 1},
             {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1}], [])),
        "aotinductor-shared-library": Pt2Edit(add={"data/aotinductor/model/model.so": b"\x7fELF" + bytes(60)}),
        "json-nested-past-the-recursion-limit": Pt2Edit(replace={MODEL_JSON: b"[" * 100_000 + b"]" * 100_000}),
    }
