"""A run's settings as JSON text (the API's ``config`` form field, the CLI's ``--config`` file),
read one way and refused in one wording wherever they arrive. Standard library only: the
client's commands, which need nothing but httpx, read config files with it too.
"""

import json
import math

EXAMPLE = '{"seed": 0}'


def parse_config_json(text: str | bytes) -> dict:
    """The JSON object in ``text``; ValueError says what is wrong with it.

    NaN and Infinity are Python's extensions of JSON: PostgreSQL refuses them in a JSON column,
    and no setting means anything with them."""
    try:
        value = json.loads(text, parse_float=finite_float, parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"config is not valid JSON ({e}); write a JSON object such as {EXAMPLE}") from None
    except RecursionError:
        raise ValueError(f"config is nested too deeply; write a JSON object such as {EXAMPLE}") from None
    if not isinstance(value, dict):
        raise ValueError(f"config must be a JSON object such as {EXAMPLE}")
    return value


def describe_invalid_config(errors: list[dict]) -> tuple[str, list[dict]]:
    """Pydantic's errors about a config, as one sentence and as {"loc": "config.seed", "msg": ...}
    entries."""
    described = [{"loc": ".".join(["config", *map(str, error["loc"])]), "msg": error["msg"]} for error in errors]
    detail = "; ".join(f"{error['loc']}: {error['msg']}" for error in described)
    return f"invalid config: {detail} (see docs/config.md)", described


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as inf
        raise ValueError(f"{text} is out of range")
    return value


def refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")
