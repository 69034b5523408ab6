"""A sealed or term column in a query: what it is compared with, and what is refused around it.

Plaintext never becomes a query parameter and no function of sealed bytes is computed:

* a value compared with the column goes through :meth:`QueriedColumn.get_db_prep_value`, which
  takes only what keymgr computed (``find()``'s terms);
* the column answers only the lookups of :data:`_LOOKUPS`, with no expression on the right-hand
  side but the column itself (:class:`_ExpressionGuard`);
* the first time the column is compiled into a query (:class:`_SealedCol`), the query's other
  comparisons, its functions of the column and, for a subquery, the column it selects as its
  value are checked (:func:`_check_comparisons`).

The checks know a sealed or term column by its class, :class:`QueriedColumn`; what a write takes
and a read gives back is :class:`keymgr.fields.django._columns.MarkedColumn`'s.
"""

from __future__ import annotations

import functools
from typing import Any

from django.core.exceptions import FieldError
from django.db import models
from django.db.models import Count
from django.db.models.expressions import Col
from django.db.models.lookups import Lookup
from django.db.models.sql import Query
from django.db.models.sql.where import WhereNode

from keymgr import errors


def refused(field: models.Field, what: str) -> errors.ConfigurationError:
    """The error for a plaintext or an expression refused in or against ``field``'s column."""
    return errors.ConfigurationError(
        f"{field.model.__name__}.{field.name} is {what}: it takes only what save() / bulk_create() compute "
        "(filter(), update() and bulk_update() bypass that, and so does an expression such as Value()); "
        "refusing to write or compare it in the clear (find by value through a BlindIndexField and .find())")


def own_column(field: models.Field, value: Any) -> bool:
    """``value`` (a resolved expression) is the column itself, ``F(field)``: what :meth:`pre_save`
    returns to keep what the database holds. Any other expression (``Value``, ``Lower(...)``, another
    column) could carry plaintext into the column or a query parameter."""
    return isinstance(value, Col) and value.target is field


#: The lookups a sealed or term column answers: IS NULL, and equality with values keymgr computed
#: (``find()``'s terms); ``contains``, ``startswith``, ``gt``... would send plaintext as a query
#: parameter (to be compared with ciphertext, and written to the database's logs).
_LOOKUPS = frozenset({"exact", "in", "isnull"})


class _ExpressionGuard:
    """Mixed into the lookups of :data:`_LOOKUPS`: an expression on the right-hand side
    (``filter(email=Value(...))``, ``email__in=[Value(...)]``, ``Lower(Value(...))``) is compiled
    by Django with its own output field, never through the column's checks, so any but the column
    itself is refused before a parameter is built."""

    lhs: Any
    rhs: Any

    def get_prep_lookup(self) -> Any:
        field = self.lhs.output_field
        items = self.rhs if isinstance(self.rhs, list | tuple | set | frozenset) else (self.rhs,)
        if any(hasattr(item, "resolve_expression") and not own_column(field, item) for item in items):
            raise refused(field, field.what)
        return super().get_prep_lookup()  # type: ignore[misc]


@functools.cache
def _guarded(lookup: type) -> type:
    return type(f"Sealed{lookup.__name__}", (_ExpressionGuard, lookup), {})


class _SealedCol(Col):  # type: ignore[misc]
    """A sealed or term column in a query. Django picks a comparison's lookup by its left-hand
    side, so ``Exact(Value(plain), F("email"))`` or ``annotate(v=Value(plain)).filter(v=F("email"))``
    never reaches the column's lookups (:class:`_ExpressionGuard`): the first time the column
    is compiled into a query, that query's comparisons are checked (:func:`_check_comparisons`)."""

    def as_sql(self, compiler: Any, connection: Any) -> Any:
        _check_comparisons(compiler)
        return super().as_sql(compiler, connection)


def _selected(query: Query) -> list[Any]:
    """What ``query``, used as a subquery, yields: its selected columns and annotations (none for
    a query of the model's default columns, which cannot stand for one value)."""
    if query.default_cols:
        return []
    return [*query.select, *query.annotation_select.values()]


def _sources(node: Any) -> list[Any]:
    if isinstance(node, Query):
        return _selected(node)
    return list(node.get_source_expressions()) if hasattr(node, "get_source_expressions") else []


def _marked_in(expression: Any) -> models.Field | None:
    """The sealed or term column ``expression`` compares (the column, inside a function, or the
    value a subquery selects)."""
    stack = [expression]
    while stack:
        node = stack.pop()
        if isinstance(node, Col) and isinstance(node.target, QueriedColumn):
            return node.target
        stack.extend(_sources(node))
    return None


def _marked_value(node: Any) -> models.Field | None:
    """The sealed or term column whose value ``node`` yields, itself or passed through (a
    ``Case``, a ``Ref`` to an annotation, a function's argument, a subquery's one column); a
    condition (a lookup, a WHERE) yields a boolean, checked as a comparison of its own."""
    if isinstance(node, Col):
        return node.target if isinstance(node.target, QueriedColumn) else None
    if isinstance(node, Lookup | WhereNode):
        return None
    sources = _sources(node)
    if isinstance(node, Query) and len(sources) != 1:
        return None
    for source in sources:
        field = _marked_value(source)
        if field is not None:
            return field
    return None


def _output_field(node: Any) -> Any:
    try:
        return node._output_field_or_none
    except (AttributeError, FieldError):  # sources of mixed types: not a sealed column's value
        return None


def _check_function(node: Any) -> None:
    """Refuse a function (``Cast``, ``Substr``, ``ExpressionWrapper``, arithmetic, ``Max``...) of
    a sealed or term column, whatever it is used for: its output field is another field's (a
    text field), whose lookups send their value, a plaintext, as a query parameter. No function
    of these opaque bytes means anything; ``Count`` (no value) and an expression that stays the
    column's value (``Case``/``When``, ``Coalesce`` of the column: the column's own lookups) pass."""
    if isinstance(node, Col | Lookup | WhereNode | Query | Count):
        return
    if isinstance(_output_field(node), QueriedColumn):
        return
    for source in _sources(node):
        field = _marked_value(source)
        if field is not None:
            raise errors.ConfigurationError(
                f"{field.model.__name__}.{field.name} is {field.what}: refusing {type(node).__name__}() of it "
                "(its result would be compared or written in the clear; no function of sealed bytes means anything)")


def _check_comparisons(compiler: Any) -> None:
    """Refuse, in the query's WHERE / HAVING and annotations: a comparison of two expressions
    (``Exact(Value(p), F(email))``, ``Case(When(...))``) that holds a sealed or term column on
    either side, unless it is one of the column's own lookups (:class:`_ExpressionGuard` checked
    it) or compares the column with itself; any function of such a column
    (:func:`_check_function`); and, for a query compiled as a subquery, selecting such a column as
    its one value (whatever compares it is another query's, never checked by the column). The
    other side may be plaintext (``Value(...)``), sent as a query parameter. A comparison with a
    direct value goes through the column's ``get_db_prep_value`` (refused unless keymgr computed
    it). Once per compiler."""
    if getattr(compiler, "_keymgr_compared", False):
        return
    compiler._keymgr_compared = True
    query = compiler.query
    selected = _selected(query) if getattr(query, "subquery", False) else []
    if len(selected) == 1:
        field = _marked_value(selected[0])
        if field is not None:
            raise refused(field, f"{field.what}, selected by a subquery")
    stack = [getattr(query, "where", None), *getattr(query, "annotations", {}).values()]
    while stack:
        node = stack.pop()
        if node is None or not hasattr(node, "get_source_expressions"):
            continue
        if isinstance(node, Lookup) and not isinstance(node, _ExpressionGuard) and not node.rhs_is_direct_value():
            field = _marked_in(node.rhs) or _marked_in(node.lhs)
            if field is not None and not (own_column(field, node.lhs) and own_column(field, node.rhs)):
                raise refused(field, field.what)
        _check_function(node)
        stack.extend(node.get_source_expressions())


class QueriedColumn(models.Field):  # type: ignore[misc]
    """A sealed or term column as a query sees it: compared only with values of one marker type
    (what keymgr computed: a plaintext is refused, never sent as a query parameter), answering
    only the lookups of :data:`_LOOKUPS` (refused by name, before any parameter is built), and
    compiled as a :class:`_SealedCol`, which checks the query it is in."""

    marker: type[bytes] = bytes
    what = ""

    def get_col(self, alias: str, output_field: models.Field | None = None) -> Col:
        """The column in a query, as a :class:`_SealedCol` (which checks the query's comparisons)."""
        if output_field is None or output_field is self:
            if alias == self.model._meta.db_table:
                return self.cached_col
            output_field = self
        return _SealedCol(alias, self, output_field)

    @functools.cached_property
    def cached_col(self) -> Col:
        return _SealedCol(self.model._meta.db_table, self)

    def get_prep_value(self, value: Any) -> Any:
        return value

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> bytes | None:
        if value is None:
            return None
        if not isinstance(value, self.marker):
            raise refused(self, self.what)
        return bytes(value)

    def get_lookup(self, lookup_name: str) -> Any:
        if lookup_name not in _LOOKUPS:
            raise errors.ConfigurationError(f"{self.model.__name__}.{self.name} is sealed: no {lookup_name!r} lookup "
                                            "(only isnull; find() for equality through a BlindIndexField)")
        return _guarded(super().get_lookup(lookup_name))

    def get_transform(self, lookup_name: str) -> Any:
        raise errors.ConfigurationError(f"{self.model.__name__}.{self.name} is sealed: no {lookup_name!r} transform")
