"""Deterministic sample instances of every wire message, built from the type annotations."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import msgspec
import msgspec.inspect as mi

import erllama.protocol as protocol_pkg
from erllama.protocol.messages import Msg


def all_message_classes() -> list[type[Msg]]:
    """Every concrete tagged message of every protocol module, sorted by tag."""
    for mod in pkgutil.iter_modules(protocol_pkg.__path__):
        importlib.import_module(f"erllama.protocol.{mod.name}")
    seen: dict[str, type[Msg]] = {}
    stack: list[type[Msg]] = list(Msg.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        tag = cls.__struct_config__.tag
        if isinstance(tag, str):
            assert tag not in seen or seen[tag] is cls, f"tag {tag!r} used twice"
            seen[tag] = cls
    return [seen[t] for t in sorted(seen)]


def sample_for(t: mi.Type) -> Any:
    if isinstance(t, mi.StrType):
        return "x" * max(1, t.min_length or 1)
    if isinstance(t, mi.BoolType):
        return True
    if isinstance(t, mi.IntType):
        return 1 if t.ge is None else max(1, t.ge)
    if isinstance(t, mi.FloatType):
        return 0.5
    if isinstance(t, mi.BytesType):
        n = t.min_length or 4
        return bytes(range(n))
    if isinstance(t, mi.NoneType):
        return None
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    if isinstance(t, mi.UnionType):
        non_none = [x for x in t.types if not isinstance(x, mi.NoneType)]
        return sample_for(non_none[0]) if non_none else None
    if isinstance(t, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)):
        return [sample_for(t.item_type)]
    if isinstance(t, mi.DictType):
        value = sample_for(t.value_type)
        return {"a": 1 if isinstance(t.value_type, mi.AnyType) else value}
    if isinstance(t, mi.StructType):
        return sample_struct(t.cls)
    if isinstance(t, mi.RawType):
        return msgspec.Raw(msgspec.msgpack.encode({"ok": 1}))
    if isinstance(t, mi.AnyType):
        return 1
    if isinstance(t, mi.MetaType):
        return sample_for(t.type)
    raise NotImplementedError(f"no sample for {t!r}")


def sample_struct(cls: type[Any]) -> Any:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    kwargs = {}
    for f in info.fields:
        kwargs[f.name] = sample_for(f.type)
    if "request_id" in kwargs:
        kwargs["request_id"] = "req-1"
    return cls(**kwargs)
