"""The function catalog behind ``FunctionCallEnv``: blueprints, value pools, request phrases.

A ``FunctionBlueprint`` is a plausible API function (``get_forecast``, ``book_hotel``,
``convert_length``, ...) with typed ``ParamBlueprint``s: string, integer, number, boolean,
enum, array (of strings or of enum choices) and nested object, some optional. A task never
offers a blueprint as it is: ``draw_function`` gives it one of its names, one name per
parameter and a random ``required`` list (a parameter every request states is still
optional in some schemas), and ``draw_call`` draws argument values and the clause of the
request that states them ("get the weather forecast for Lima for the next 3 days"), so
the clause determines the call exactly.

Rules the draws keep, so that a request has exactly one right call: values within a call
differ (no trip from Oslo to Oslo); a stated optional parameter never takes its schema
default (the request would then say nothing a call without it does not); booleans are all
optional, default false, and stated only as true.

What this module does not do: compose requests from several clauses, pick categories or
score calls (``function_call.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Kind = Literal["string", "integer", "number", "boolean", "enum", "array", "object"]
"""Parameter types; ``enum`` is a JSON-schema string with an ``enum`` list."""

REQUIRED_RATE = 0.85
"""How often a parameter every request states is listed as required in a schema."""

OPTIONAL_STATED_RATE = 0.5
"""How often a request states an optional parameter."""


@dataclass(frozen=True)
class ParamBlueprint:
    """One parameter of a catalog function, before a task picks its name."""

    names: tuple[str, ...]
    """The names a task may give it (one is drawn per task); a nested field uses the first."""
    kind: Kind
    """Its type."""
    description: str
    """The schema's description."""
    phrase: str
    """How a request states it: ``{}`` takes the value's text (an object's, each field's by
    name); empty for a nested field, which its object's phrase states."""
    draw: str = ""
    """The key in ``DRAWS`` of its value generator; enums and arrays of enums draw from
    ``options`` instead."""
    options: tuple[str, ...] = ()
    """An enum's choices, or the choices of an array's items."""
    optional: bool = False
    """Optional in every schema, and stated in some requests only."""
    default: Any = None
    """The schema's ``default`` (None: none)."""
    fields: tuple[ParamBlueprint, ...] = ()
    """A nested object's fields, all required."""


@dataclass(frozen=True)
class FunctionBlueprint:
    """One catalog function (see the module docstring)."""

    domain: str
    """Its domain (weather, bookings, ...): an irrelevance task offers none of the domain
    its request comes from."""
    names: tuple[str, ...]
    """The names a task may give it."""
    description: str
    """The schema's description."""
    clause: str
    """The request's verb phrase; the phrases of the stated parameters follow it."""
    params: tuple[ParamBlueprint, ...]
    """Its parameters, in schema and phrase order."""


@dataclass(frozen=True)
class DrawnFunction:
    """A blueprint as one task offers it."""

    blueprint: FunctionBlueprint
    """What it was drawn from."""
    spec: dict[str, Any]
    """``{"name", "description", "parameters"}``, the parameters as a JSON schema."""
    param_names: tuple[str, ...]
    """The name each of the blueprint's parameters got, in order."""

    @property
    def name(self) -> str:
        """The function's name in this task."""
        return str(self.spec["name"])


def _param(
    names: str, kind: Kind, description: str, phrase: str, draw: str = "", **more: Any
) -> ParamBlueprint:
    """A ``ParamBlueprint``; ``names`` lists the alternatives separated by ``|``."""
    return ParamBlueprint(tuple(names.split("|")), kind, description, phrase, draw, **more)


def _function(
    domain: str, names: str, description: str, clause: str, *params: ParamBlueprint
) -> FunctionBlueprint:
    """A ``FunctionBlueprint``; ``names`` lists the alternatives separated by ``|``."""
    return FunctionBlueprint(domain, tuple(names.split("|")), description, clause, params)


_CITY = _param("city|location", "string", "City name, e.g. 'Paris'.", "in {}", "city")
_DATE = "Date as YYYY-MM-DD."
_TIME = "Time as HH:MM."
_UNITS = ("m", "km", "mi", "ft")
_SCALES = ("celsius", "fahrenheit", "kelvin")
_CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF")

CATALOG: tuple[FunctionBlueprint, ...] = (
    _function(
        "weather", "get_current_weather|current_weather|weather_now",
        "Get the current weather in a city.", "check the current weather", _CITY,
        _param("units|unit", "enum", "Temperature units.", "in {}",
               options=("celsius", "fahrenheit"), default="celsius", optional=True),
    ),
    _function(
        "weather", "get_forecast|weather_forecast|daily_forecast",
        "Get a daily weather forecast for a city.", "get the weather forecast",
        _param("city|location", "string", "City name.", "for {}", "city"),
        _param("days|num_days", "integer", "Days ahead, 1 to 10.", "for the next {} days", "days"),
        _param("include_hourly|hourly", "boolean", "Add hourly detail.", "with hourly detail",
               default=False, optional=True),
    ),
    _function(
        "weather", "get_air_quality|air_quality_index",
        "Get the air quality index of a city.", "look up the air quality", _CITY,
        _param("pollutant", "enum", "Which pollutant to report.", "for {}",
               options=("pm25", "ozone", "no2"), optional=True),
    ),
    _function(
        "bookings", "book_hotel|reserve_room|hotel_booking",
        "Book a hotel room.", "book a hotel room", _CITY,
        _param("check_in|arrival_date", "string", _DATE, "from {}", "date"),
        _param("nights|num_nights", "integer", "Number of nights.", "for {} nights", "count"),
        _param("guest|guest_info", "object", "The guest's details.", "for {name} ({email})",
               fields=(_param("name", "string", "Full name.", "", "person"),
                       _param("email", "string", "Email address.", "", "email"))),
        _param("room_type|room", "enum", "Kind of room.", "as a {} room",
               options=("double", "single", "suite"), default="double", optional=True),
    ),
    _function(
        "bookings", "book_table|reserve_table",
        "Reserve a restaurant table.", "reserve a table",
        _param("restaurant|venue", "string", "Restaurant name.", "at {}", "restaurant"),
        _param("party_size|guests", "integer", "Number of people.", "for {} people", "count"),
        _param("date|day", "string", _DATE, "on {}", "date"),
        _param("time|hour", "string", _TIME, "at {}", "time"),
    ),
    _function(
        "bookings", "cancel_booking|cancel_reservation",
        "Cancel a booking by its id.", "cancel the booking",
        _param("booking_id|reference", "string", "Booking id, e.g. 'BK-1234'.", "{}", "booking"),
        _param("refund|issue_refund", "boolean", "Refund the payment.", "with a refund",
               default=False, optional=True),
    ),
    _function(
        "conversion", "convert_length|length_convert",
        "Convert a length between units.", "convert",
        _param("value|amount", "number", "The length.", "{}", "length"),
        _param("from_unit|source_unit", "enum", "Unit of the value.", "from {}", options=_UNITS),
        _param("to_unit|target_unit", "enum", "Unit wanted.", "to {}", options=_UNITS),
    ),
    _function(
        "conversion", "convert_temperature|temperature_convert",
        "Convert a temperature between scales.", "convert the temperature",
        _param("value|temperature", "number", "The temperature.", "{}", "temperature"),
        _param("from_scale|source_scale", "enum", "Scale of the value.", "from {}",
               options=_SCALES),
        _param("to_scale|target_scale", "enum", "Scale wanted.", "to {}", options=_SCALES),
    ),
    _function(
        "conversion", "get_exchange_rates|fx_rates",
        "Get exchange rates from a base currency.", "get the exchange rates",
        _param("base|base_currency", "enum", "Base currency.", "from {}", options=_CURRENCIES),
        _param("symbols|currencies", "array", "Currencies to quote.", "to {}",
               options=_CURRENCIES),
    ),
    _function(
        "messaging", "send_message|post_message|chat_send",
        "Send a chat message to a person.", "send a message",
        _param("recipient|to", "string", "Who receives it.", "to {}", "person"),
        _param("text|message", "string", "The message text.", 'saying "{}"', "message"),
    ),
    _function(
        "messaging", "send_email|email_send|compose_email",
        "Send an email.", "send an email",
        _param("to|recipients", "array", "Names of the recipients.", "to {}", "people"),
        _param("subject|title", "string", "Subject line.", 'with the subject "{}"', "subject"),
        _param("urgent|high_priority", "boolean", "Flag it as urgent.", "marked as urgent",
               default=False, optional=True),
    ),
    _function(
        "messaging", "create_reminder|add_reminder",
        "Create a reminder.", "set a reminder",
        _param("text|note", "string", "What to be reminded of.", 'to "{}"', "chore"),
        _param("date|day", "string", _DATE, "on {}", "date"),
        _param("time|at", "string", _TIME, "at {}", "time", optional=True),
    ),
    _function(
        "inventory", "check_stock|get_stock_level|stock_lookup",
        "Get the stock level of a product.", "check the stock level",
        _param("sku|product_id", "string", "Product code, e.g. 'SKU-1234'.", "of {}", "sku"),
        _param("warehouse|site", "enum", "Which warehouse.", "in the {} warehouse",
               options=("north", "south", "east", "west"), optional=True),
    ),
    _function(
        "inventory", "reorder_item|restock_item|place_reorder",
        "Order more of a product from a supplier.", "reorder",
        _param("quantity|units", "integer", "How many units.", "{} units", "quantity"),
        _param("sku|product_id", "string", "Product code.", "of {}", "sku"),
        _param("supplier|vendor", "object", "Supplier and shipping speed.",
               "from {name} with {shipping} shipping",
               fields=(_param("name", "string", "Supplier name.", "", "supplier"),
                       _param("shipping", "enum", "Shipping speed.", "",
                              options=("standard", "express")))),
    ),
    _function(
        "inventory", "list_low_stock|low_stock_report",
        "List the products running low.", "list the products",
        _param("threshold|below", "integer", "Stock level under which a product counts as low.",
               "with fewer than {} units left", "quantity"),
        _param("category|department", "enum", "Product category.", "in the {} category",
               options=("tools", "garden", "kitchen", "toys"), optional=True),
    ),
    _function(
        "travel", "get_directions|route_planner|find_route",
        "Plan a route between two cities.", "get directions",
        _param("origin|start", "string", "Starting city.", "from {}", "city"),
        _param("destination|end", "string", "Destination city.", "to {}", "city"),
        _param("mode|travel_mode", "enum", "How to travel.", "by {}",
               options=("driving", "walking", "transit", "cycling"), default="driving",
               optional=True),
    ),
    _function(
        "travel", "search_flights|find_flights|flight_search",
        "Search flights between two cities.", "find flights",
        _param("origin|departure_city", "string", "Departure city.", "from {}", "city"),
        _param("destination|arrival_city", "string", "Arrival city.", "to {}", "city"),
        _param("date|departure_date", "string", _DATE, "on {}", "date"),
        _param("max_stops|stops", "integer", "Most stops allowed.", "with at most {} stops",
               "stops", optional=True),
    ),
)  # fmt: skip
"""Every function a task may offer, six domains."""

_CITIES = (
    "Paris", "Lima", "Osaka", "Nairobi", "Oslo", "Denver", "Hanoi", "Porto",
    "Cairo", "Quito", "Perth", "Dublin", "Seoul", "Tunis", "Bergen", "Austin",
)  # fmt: skip
_PEOPLE = (
    "Ana Ruiz", "Ben Okafor", "Chloe Martin", "Dev Patel", "Eva Novak",
    "Farid Haddad", "Grace Kim", "Hugo Silva", "Ines Costa", "Jonas Berg",
)  # fmt: skip
_POOLS = {
    "city": _CITIES,
    "person": _PEOPLE,
    "restaurant": ("Blue Fig", "Casa Lupe", "The Olive Room", "Sora Sushi", "Harbor Grill"),
    "message": ("See you at noon", "The meeting moved to Friday", "Running ten minutes late",
                "Call me back when you can", "Lunch is on me today"),
    "subject": ("Budget review", "Team offsite plan", "Quarterly report", "New office hours",
                "Project kickoff"),
    "chore": ("call the dentist", "water the plants", "renew the passport", "pay the rent",
              "pick up the parcel"),
    "supplier": ("Acme Parts", "Nordic Supply", "Keller and Sons", "Delta Wholesale"),
}  # fmt: skip


def _pick(rng: np.random.Generator, pool: Sequence[Any]) -> Any:
    return pool[int(rng.integers(len(pool)))]


def _pool(pool: Sequence[Any]) -> Callable[[np.random.Generator], Any]:
    return lambda rng: _pick(rng, pool)


def _people(rng: np.random.Generator) -> list[str]:
    return [str(person) for person in rng.choice(_PEOPLE, int(rng.integers(2, 4)), False)]


def _email(rng: np.random.Generator) -> str:
    return f"guest{rng.integers(100, 1000)}@example.com"


DRAWS: dict[str, Callable[[np.random.Generator], Any]] = {
    **{key: _pool(pool) for key, pool in _POOLS.items()},
    "people": _people,
    "email": _email,
    "date": lambda rng: f"2026-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}",
    "time": lambda rng: f"{rng.integers(7, 22):02d}:{_pick(rng, (0, 15, 30, 45)):02d}",
    "days": lambda rng: int(rng.integers(2, 11)),
    "count": lambda rng: int(rng.integers(2, 9)),
    "stops": lambda rng: int(rng.integers(2, 4)),
    "quantity": lambda rng: int(rng.integers(10, 500)),
    "length": lambda rng: round(float(rng.uniform(0.5, 900)), 1),
    "temperature": lambda rng: round(float(rng.uniform(-30, 120)), 1),
    "booking": lambda rng: f"BK-{rng.integers(1000, 10000)}",
    "sku": lambda rng: f"SKU-{rng.integers(1000, 10000)}",
}  # fmt: skip
"""Value generators by ``ParamBlueprint.draw`` key."""

# ---------------------------------------------------------------------------------- draws

_JSON_TYPES = {"enum": "string"}


def param_schema(param: ParamBlueprint) -> dict[str, Any]:
    """The JSON schema of one parameter."""
    schema: dict[str, Any] = {"type": _JSON_TYPES.get(param.kind, param.kind)}
    schema["description"] = param.description
    if param.kind == "enum":
        schema["enum"] = list(param.options)
    if param.kind == "array":
        schema["items"] = {
            "type": "string",
            **({"enum": list(param.options)} if param.options else {}),
        }
    if param.kind == "object":
        schema["properties"] = {field.names[0]: param_schema(field) for field in param.fields}
        schema["required"] = [field.names[0] for field in param.fields]
    if param.default is not None:
        schema["default"] = param.default
    return schema


def draw_function(rng: np.random.Generator, blueprint: FunctionBlueprint) -> DrawnFunction:
    """``blueprint`` with drawn function and parameter names and ``required`` list."""
    names = tuple(str(_pick(rng, param.names)) for param in blueprint.params)
    required = [
        name
        for name, param in zip(names, blueprint.params, strict=True)
        if not param.optional and rng.random() < REQUIRED_RATE
    ]
    parameters = {
        "type": "object",
        "properties": {
            name: param_schema(p) for name, p in zip(names, blueprint.params, strict=True)
        },
        "required": required,
    }
    spec = {
        "name": str(_pick(rng, blueprint.names)),
        "description": blueprint.description,
        "parameters": parameters,
    }
    return DrawnFunction(blueprint, spec, names)


def draw_call(rng: np.random.Generator, function: DrawnFunction) -> tuple[str, dict[str, Any]]:
    """A request clause and the arguments it states (every required one, some optional)."""
    used: set[Hashable] = set()
    clause, arguments = [function.blueprint.clause], {}
    for name, param in zip(function.param_names, function.blueprint.params, strict=True):
        if param.optional and rng.random() >= OPTIONAL_STATED_RATE:
            continue
        value = _draw_value(rng, param, used)
        arguments[name] = value
        clause.append(_phrase(param, value))
    return " ".join(clause), arguments


def _draw_value(rng: np.random.Generator, param: ParamBlueprint, used: set[Hashable]) -> Any:
    """A value for ``param`` unlike the call's ``used`` values and the schema's default."""
    if param.kind == "boolean":
        return not param.default
    if param.kind == "object":
        return {field.names[0]: _draw_value(rng, field, used) for field in param.fields}
    if param.options:
        choices = [o for o in param.options if o not in used and o != param.default]
        if param.kind == "array":
            size = min(len(choices), int(rng.integers(2, 4)))
            value: Any = [str(choice) for choice in rng.choice(choices, size, replace=False)]
        else:
            value = str(_pick(rng, choices))
    else:
        for _ in range(16):  # a few pools are small: give up on distinct values after that
            value = DRAWS[param.draw](rng)
            if not set(_leaves(value)) & used:
                break
    used.update(_leaves(value))
    return value


def _leaves(value: Any) -> list[Hashable]:
    return list(value) if isinstance(value, list) else [value]


def value_text(value: Any) -> str:
    """How a request writes a value: ``12.5``, ``"Ana Ruiz and Ben Okafor"``, ``"Paris"``."""
    if isinstance(value, list):
        texts = [value_text(item) for item in value]
        return ", ".join(texts[:-1]) + " and " + texts[-1] if len(texts) > 1 else "".join(texts)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _phrase(param: ParamBlueprint, value: Any) -> str:
    if isinstance(value, dict):
        return param.phrase.format(**{key: value_text(v) for key, v in value.items()})
    return param.phrase.format(value_text(value))
