"""Result tables: a batch's task results as one DataFrame, filtered by an archive's rules file.

The optional table stage (`handler.table`) sits at the end of a task's `postprocess`:

    per-item results --flatten--> one DataFrame (pandas, or cuDF on a GPU worker)
        --rules (allow/deny, min scores, renames)--> --handler.postprocess_table(df)-->
        --regroup--> per-item results (same schema, plus "counts")

One row per entry of a result's list: `predictions` (classifier: `index` -> column `class_id`,
`probability` -> column `score`) or `detections` (`class_id`, `label`, `score`, `box` -> columns
`x1, y1, x2, y2`), with the column `item` = the result's position in the list given to the stage.
Results without such a list, and `RequestError` items, pass through untouched. The same pandas-API
code runs on either engine; `cudf` and `pandas` are imported only when the stage is enabled, with an
install hint.
`cudf.pandas.install()` is never called: it is process-global and brings its own memory pool.

The rules CSV (docs/tables.md) has a header row and the columns `label` (required; `*` = every
label), `min_score`, `rename`, `action` (`allow` | `deny` | empty). Rules match the model's label
(before renaming); errors name the file, line and column.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelLoadError, RequestError
from .extras import install_hint

logger = logging.getLogger(__name__)

ENGINES = ("auto", "pandas", "cudf")
RULE_COLUMNS = ("label", "min_score", "rename", "action")
ACTIONS = ("allow", "deny", "")
ANY_LABEL = "*"
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
_SCALARS = {bool, int, float, str, type(None)}
PANDAS_HINT = "pip install 'torchserve-gpu-handlers[tables]'"


@dataclass(frozen=True)
class TableSpec:
    """How a task's results become table rows: declared by the task (its `table` attribute).

    `key` names the result's list (one row per entry), `renames` maps entry keys to column names,
    and `columns` are the columns every table of this kind has (in this order), even when the batch
    has no entries. An entry's `box` becomes the columns x1, y1, x2, y2.
    """

    key: str
    columns: tuple[str, ...]
    renames: Mapping[str, str] = field(default_factory=dict)


def _registered_specs() -> tuple[TableSpec, ...]:
    from .tasks import table_specs  # the task registry; imported when a stage is made, not at import

    return table_specs()
_DTYPES = {"item": "int64", "class_id": "int64", "score": "float64", "label": "object",
           **{c: "float64" for c in BOX_COLUMNS}}


# --- rules -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelRule:
    """One row of the rules CSV."""

    label: str
    min_score: float | None = None
    rename: str = ""
    action: str = ""
    line: int = 0


@dataclass(frozen=True)
class TableRules:
    """A parsed rules CSV. Empty rules change nothing (the stage then only adds counts)."""

    rules: tuple[LabelRule, ...] = ()
    source: str = ""
    default_min_score: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        star = [r for r in self.rules if r.label == ANY_LABEL]
        object.__setattr__(self, "default_min_score", star[0].min_score if star else None)

    def _labels(self, action: str) -> list[str]:
        return [r.label for r in self.rules if r.action == action]

    @property
    def allowed(self) -> list[str]:
        """Labels with action allow; when any exists, only these labels pass."""
        return self._labels("allow")

    @property
    def denied(self) -> list[str]:
        return self._labels("deny")

    @property
    def renames(self) -> dict[str, str]:
        return {r.label: r.rename for r in self.rules if r.rename}

    def min_score_groups(self) -> dict[float, list[str]]:
        """Labels grouped by their own minimum score (few distinct values: one mask per value)."""
        groups: dict[float, list[str]] = {}
        for r in self.rules:
            if r.min_score is not None and r.label != ANY_LABEL:
                groups.setdefault(r.min_score, []).append(r.label)
        return groups


def load_rules(path: Path) -> TableRules:
    """Read and validate a rules CSV; ConfigError naming file, line and column on a bad value."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets save a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: cannot read the table rules file ({exc})") from None
    return parse_rules(text, path.name)


def parse_rules(text: str, source: str = "rules.csv") -> TableRules:
    """Parse rules CSV text (see the module docstring and docs/tables.md for the schema)."""
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rules: list[LabelRule] = []
    seen: dict[str, int] = {}
    for cells in reader:
        line = reader.line_num
        if not cells or all(not c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = _header(cells, source, line)
            continue
        rule = _rule(cells, header, source, line)
        if rule.label in seen:
            raise ConfigError(
                f"{source} line {line}, column label: {rule.label!r} already has a rule on line "
                f"{seen[rule.label]}; write one row per label"
            )
        seen[rule.label] = line
        rules.append(rule)
    if header is None:
        raise ConfigError(f"{source}: no header row; the first line must name the columns, e.g. "
                          f"{','.join(RULE_COLUMNS)}")
    _check_renames(rules, source)
    return TableRules(tuple(rules), source)


def _header(cells: list[str], source: str, line: int) -> list[str]:
    names = [c.strip().lower() for c in cells]
    for col, name in enumerate(names, 1):
        if name not in RULE_COLUMNS:
            raise ConfigError(f"{source} line {line}, column {col}: unknown column {name!r}; "
                              f"known columns: {', '.join(RULE_COLUMNS)}")
        if names.index(name) != col - 1:
            raise ConfigError(f"{source} line {line}, column {col}: column {name!r} appears twice")
    if "label" not in names:
        raise ConfigError(f"{source} line {line}: the header has no 'label' column; "
                          f"expected e.g. {','.join(RULE_COLUMNS)}")
    return names


def _rule(cells: list[str], header: list[str], source: str, line: int) -> LabelRule:
    if len(cells) > len(header):
        raise ConfigError(f"{source} line {line}: {len(cells)} values for {len(header)} columns "
                          f"({','.join(header)}); quote values that contain a comma")
    values = {name: (cells[i].strip() if i < len(cells) else "") for i, name in enumerate(header)}
    where = f"{source} line {line}, column"
    label = values["label"]
    if not label:
        raise ConfigError(f"{where} label: empty; every row names a label (or * for every label)")
    min_score = _score(values.get("min_score", ""), f"{where} min_score")
    action = values.get("action", "").lower()
    if action not in ACTIONS:
        raise ConfigError(f"{where} action: {values['action']!r} is not allow, deny or empty")
    rename = values.get("rename", "")
    if label == ANY_LABEL and (rename or action):
        raise ConfigError(f"{where} {'rename' if rename else 'action'}: the * row only sets a default "
                          f"min_score; list labels one per row to rename, allow or deny them")
    if rename == label:
        rename = ""
    return LabelRule(label, min_score, rename, action, line)


def _score(raw: str, where: str) -> float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{where}: {raw!r} is not a number (expected 0..1 or empty)") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: {raw} is outside 0..1")
    return value


def _check_renames(rules: list[LabelRule], source: str) -> None:
    # A rename onto a label that is itself renamed would chain on one engine and not on another.
    renamed = {r.label: r.line for r in rules if r.rename}
    for r in rules:
        if r.rename in renamed:
            raise ConfigError(
                f"{source} line {r.line}, column rename: {r.rename!r} is itself renamed on line "
                f"{renamed[r.rename]}; rename to the final name directly"
            )


# --- engines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """The DataFrame library of the stage: `pandas` or `cudf` (its module in `module`)."""

    name: str
    module: Any

    def upload(self, frame: Any) -> Any:
        """A pandas DataFrame -> this engine's DataFrame (cuDF copies it to the current GPU)."""
        return frame if self.name == "pandas" else self.module.DataFrame.from_pandas(frame)

    @staticmethod
    def download(obj: Any) -> Any:
        """This engine's DataFrame or Series -> pandas (one device-to-host copy for cuDF)."""
        return obj.to_pandas() if hasattr(obj, "to_pandas") else obj


def import_pandas() -> Any:
    try:
        return importlib.import_module("pandas")
    except ImportError:
        raise ModelLoadError(f"handler.table needs pandas, which is not installed: {PANDAS_HINT}") from None


def import_cudf() -> Any:
    try:
        return importlib.import_module("cudf")
    except ImportError as exc:
        raise ModelLoadError(
            f"handler.table.engine cudf: cudf could not be imported ({exc}); {install_hint('cudf')} on a "
            f"GPU host, or set handler.table.engine: pandas"
        ) from None


def resolve_engine(name: str, device_type: str) -> Engine:
    """The engine for `handler.table.engine` on a worker whose torch device type is `device_type`.

    auto = cudf on a GPU worker where it is installed and imports, pandas otherwise.
    """
    if name not in ENGINES:
        raise ConfigError(f"handler.table.engine: {name!r} is not one of {', '.join(ENGINES)}")
    on_gpu = device_type == "cuda"
    if name == "cudf":
        if not on_gpu:
            raise ConfigError(f"handler.table.engine: cudf needs a GPU worker, this one runs on "
                              f"{device_type}; use auto (pandas here) or pandas")
        return Engine("cudf", import_cudf())
    if name == "auto" and on_gpu and importlib.util.find_spec("cudf") is not None:
        try:
            return Engine("cudf", importlib.import_module("cudf"))
        except Exception as exc:  # an installed cudf that cannot load (driver, CUDA version): serve on
            logger.warning("handler.table: cudf is installed but failed to import (%s); using pandas", exc)
    return Engine("pandas", import_pandas())


# --- the stage ---------------------------------------------------------------------------------

Hook = Callable[[Any], Any]


@dataclass
class TableStage:
    """Flatten -> rules -> hook -> regroup for one batch of results."""

    engine: Engine
    rules: TableRules = field(default_factory=TableRules)
    counts: bool = True
    specs: Sequence[TableSpec] = field(default_factory=_registered_specs)
    """The result kinds the stage understands: every registered task's (handlers.tasks)."""

    def apply(self, results: list[Any], hook: Hook | None = None) -> list[Any]:
        """Per-item results -> the same list with filtered/renamed entries (and counts) per item."""
        specs = {spec.key: spec for spec in self.specs}
        kinds = [_kind(r, specs) for r in results]
        if not any(kinds):
            return list(results)
        df = self.engine.upload(flatten(results, kinds, specs))
        df = apply_rules(df, self.rules)
        if hook is not None:
            df = hook(df)
            _check_frame(df, self.engine)
        frame = self.engine.download(df)
        return regroup(results, kinds, frame, _counts(frame) if self.counts else None, specs)


def _counts(frame: Any) -> dict[int, dict[str, int]]:
    """{item: {label: rows}} of the final rows, most frequent label first (then by name)."""
    if "label" not in frame.columns:
        raise RuntimeError("table stage: handler.table.counts needs the 'label' column, which "
                           "postprocess_table dropped; keep it or set handler.table.counts: false")
    counts: dict[int, Counter[str]] = {}
    labels = frame["label"]
    for item, label, missing in zip(frame["item"].tolist(), labels.tolist(), labels.isna().tolist(), strict=True):
        if not missing:
            counts.setdefault(int(item), Counter())[str(label)] += 1
    return {i: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for i, c in counts.items()}


def load_table_stage(config: Any, model_dir: Path, device_type: str,
                     own: TableSpec | None = None) -> TableStage | None:
    """The stage for `handler.table` (a config.TableConfig), or None when it is disabled; `own` is
    the handler's own result kind when its task is not a registered one."""
    if not config.enabled:
        if config.rules:
            raise ConfigError(f"handler.table.rules is {config.rules!r} but handler.table.enabled is "
                              f"false; set handler.table.enabled: true to apply it")
        return None
    rules = TableRules()
    if config.rules:
        path = model_dir / config.rules
        if not path.is_file():
            raise ConfigError(f"handler.table.rules: {config.rules!r} is not in the archive; add it with "
                              f"tsgpu archive --extra-files {Path(config.rules).name}")
        rules = load_rules(path)
    engine = resolve_engine(config.engine, device_type)
    logger.info("table stage: %s engine, %d rules from %s", engine.name, len(rules.rules), config.rules or "-")
    specs = _registered_specs()
    if own is not None and own not in specs:
        specs = (*[s for s in specs if s.key != own.key], own)
    return TableStage(engine, rules, counts=config.counts, specs=specs)


def _kind(result: Any, specs: Mapping[str, TableSpec]) -> str | None:
    if isinstance(result, RequestError) or not isinstance(result, dict):
        return None
    for key in specs:
        if isinstance(result.get(key), list):
            return key
    return None


def _check_frame(df: Any, engine: Engine) -> None:
    if not hasattr(df, "columns") or not hasattr(df, "groupby"):
        raise RuntimeError(f"postprocess_table must return a DataFrame, got {type(df).__name__}")
    if "item" not in df.columns:
        raise RuntimeError("postprocess_table dropped the 'item' column; it says which request each row "
                           f"belongs to and must stay (engine {engine.name})")


# --- flatten / rules / regroup -----------------------------------------------------------------


def flatten(results: list[Any], kinds: list[str | None], specs: Mapping[str, TableSpec]) -> Any:
    """The entries of every result's list as one pandas DataFrame (column `item` = position)."""
    pd = import_pandas()
    columns: dict[str, list[Any]] = {"item": []}
    for present in dict.fromkeys(filter(None, kinds)):  # a batch without entries still has the columns
        for name in specs[present].columns:
            columns.setdefault(name, [])
    n = 0
    for item, (result, kind) in enumerate(zip(results, kinds, strict=True)):
        entries = result[kind] if kind else None
        if not kind or not entries:
            continue
        columns["item"].extend([item] * len(entries))
        for name, values in _entry_columns(entries, kind, specs[kind].renames).items():
            columns.setdefault(name, [None] * n).extend(values)
        n += len(entries)
        for values in columns.values():  # keys this item's entries lack
            values.extend([None] * (n - len(values)))
    return pd.DataFrame({name: _series(pd, name, values) for name, values in columns.items()})


def _entry_columns(entries: list[dict[str, Any]], kind: str, names: Mapping[str, str]) -> dict[str, list[Any]]:
    """One result's entries, column by column (box -> x1, y1, x2, y2; other keys through `names`)."""
    out: dict[str, list[Any]] = {}
    for key in dict.fromkeys(k for e in entries for k in e):
        values = [e.get(key) for e in entries]
        if key == "box":
            boxes = [_box(v, kind) for v in values]
            for i, col in enumerate(BOX_COLUMNS):
                out[col] = [b[i] for b in boxes]
            continue
        if not {type(v) for v in values} <= _SCALARS:
            bad = next(v for v in values if type(v) not in _SCALARS)
            raise RuntimeError(f"table stage: {kind} entry {key!r} holds a {type(bad).__name__}; only "
                               f"numbers, strings and 'box' become columns")
        out[names.get(key, key)] = values
    return out


def _series(pd: Any, name: str, values: list[Any]) -> Any:
    dtype = _DTYPES.get(name) if all(v is not None for v in values) else None
    return pd.Series(values, dtype=dtype if dtype or values else "object")


def _box(value: Any, kind: str) -> Any:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise RuntimeError(f"table stage: {kind} entry 'box' must be [x1, y1, x2, y2], got {value!r}")
    return value


def apply_rules(df: Any, rules: TableRules) -> Any:
    """allow/deny and min scores on the model's labels, then renames. Keeps the row order."""
    if not rules.rules:
        return df
    keep = df["item"] >= 0  # all True, in the engine's own boolean type
    if rules.allowed:
        keep &= df["label"].isin(rules.allowed)
    if rules.denied:
        keep &= ~df["label"].isin(rules.denied)
    groups = rules.min_score_groups()
    for threshold, labels in groups.items():
        keep &= ~(df["label"].isin(labels) & (df["score"] < threshold))
    if rules.default_min_score is not None:
        own = [label for labels in groups.values() for label in labels]
        keep &= ~(~df["label"].isin(own) & (df["score"] < rules.default_min_score))
    df = df[keep].reset_index(drop=True)
    if rules.renames:
        df["label"] = df["label"].replace(rules.renames)
    return df


def regroup(results: list[Any], kinds: list[str | None], frame: Any,
            counts: dict[int, dict[str, int]] | None, specs: Mapping[str, TableSpec]) -> list[Any]:
    """A pandas DataFrame back to per-item results in their original order (rows keep table order)."""
    entries: dict[int, list[dict[str, Any]]] = {i: [] for i, kind in enumerate(kinds) if kind}
    items = [int(i) for i in frame["item"].tolist()]
    bad = sorted(set(items) - set(entries))[:5]
    if bad:
        raise RuntimeError(f"postprocess_table returned rows for item(s) {bad}, which are not results "
                           f"of this batch; keep the 'item' column as it was")
    names = [c for c in frame.columns if c != "item"]
    rows = list(zip(*(_values(frame[c]) for c in names), strict=True)) if names else [()] * len(items)
    plans = {kind: _plan(names, kind, specs) for kind in set(filter(None, kinds))}
    for item, row in zip(items, rows, strict=True):
        kind = kinds[item]
        assert kind is not None  # items with rows are items with entries (checked above)
        entries[item].append({key: [row[j] for j in cols] if key == "box" else row[cols[0]]
                              for key, cols in plans[kind]})
    out = list(results)
    for item, kind_entries in entries.items():
        result = dict(results[item])
        result[kinds[item]] = kind_entries
        if counts is not None:
            result["counts"] = counts.get(item, {})
        out[item] = result
    return out


def _plan(columns: list[str], kind: str, specs: Mapping[str, TableSpec]) -> list[tuple[str, list[int]]]:
    """(entry key, positions in `columns`) in column order; the four box columns become one 'box'."""
    back = {col: key for key, col in specs[kind].renames.items()}
    own = specs[kind].columns
    foreign = {c for spec in specs.values() for c in spec.columns} - set(own)  # another kind's, e.g. boxes
    has_box = all(c in columns for c in BOX_COLUMNS) and BOX_COLUMNS[0] not in foreign
    plan: list[tuple[str, list[int]]] = []
    for j, col in enumerate(columns):
        if col in foreign:
            continue
        if has_box and col in BOX_COLUMNS:
            if col == BOX_COLUMNS[0]:
                plan.append(("box", [columns.index(c) for c in BOX_COLUMNS]))
            continue
        plan.append((back.get(col, col), [j]))
    return plan


def _values(series: Any) -> list[Any]:
    """A column as JSON-ready Python values (missing -> None, numpy scalars -> Python)."""
    values = series.tolist()  # Python scalars for numeric columns
    if series.dtype.kind in "iub" or (series.dtype.kind == "f" and not series.hasnans):
        return values
    missing = series.isna().tolist()
    return [None if m else (v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v)
            for v, m in zip(values, missing, strict=True)]
