"""Building binding models from values that are already valid, cheaply.

The NVE builds a binding for every address it publishes (``NveCore``) and the
follower one for every canonical record it reads; pydantic's
``model_construct`` loops over the fields in Python and was a large part of
both.  ``construct_unchecked`` sets the instance's dict directly, but only if
an import-time self-check shows that it builds exactly what pydantic builds;
otherwise it is pydantic's own ``model_construct``.  Callers pass every field,
in model order, so ``orjson.dumps(vars(binding))`` is the record's canonical
JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from schemas.records import MacBinding


def _direct(model: Any, values: dict[str, Any], fields_set: set[str]) -> Any:
    """What ``model_construct`` does for these models, minus its per-field loop."""
    instance = model.__new__(model)
    object.__setattr__(instance, "__dict__", values)
    object.__setattr__(instance, "__pydantic_fields_set__", fields_set)
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


def _via_pydantic(model: Any, values: dict[str, Any], fields_set: set[str]) -> Any:
    return model.model_construct(fields_set, **values)


def _pick_constructor() -> Callable[[Any, dict[str, Any], set[str]], Any]:
    """``_direct`` only if it builds exactly what pydantic builds (else pydantic's own)."""
    sample = (b'{"v":1,"vn":"6f1c1c2e-0b7a-4d38-9a52-3f0c6c1f0a01","vni":7,'
              b'"mac":"02:00:00:00:00:01","vnic":"6f1c1c2e-0b7a-4d38-9a52-3f0c6c1f0a02",'
              b'"nve":"nve1","underlay":"192.0.2.1","ts_ns":1}')
    try:
        expected = MacBinding.model_validate_json(sample)
        built = _direct(MacBinding, dict(expected.__dict__), set(expected.model_fields_set))
        same = (built == expected and hash(built) == hash(expected)
                and built.model_fields_set == expected.model_fields_set
                and built.model_dump_json() == expected.model_dump_json()
                and built.model_copy(update={"ts_ns": 2}).ts_ns == 2)
    except Exception:
        same = False
    return _direct if same else _via_pydantic


#: ``model_construct`` for already validated values, ~10x cheaper (0.7 us against 6.8 us).
construct_unchecked = _pick_constructor()
construct_via_pydantic = _via_pydantic
