"""palaestra.envs: Gymnasium text environments for language-model agents.

Importing this package registers the built-in env ids with gymnasium, so both
``palaestra.envs.make("palaestra/Math-v0")`` and ``gymnasium.make("palaestra/Math-v0")``
work. The pieces:

- ``core``: the ``TextEnv`` contract (messages in, assistant text out).
- ``step_info``: ``StepInfo``, the typed contract of the ``info`` dicts envs return, and
  ``EnvStopReason``, the stop reasons an env may report.
- ``single_turn``: ``SingleTurnEnv``, the one-question, one-reply base.
- ``solver``: ``ScriptedSolver``, an env's scripted expert (``expert_action``).
- ``registry``: ``register`` / ``make`` / ``registered_ids``.
- ``checker``: ``check_env``, the contract checks every env must pass.
- ``tasks``: task sources (reasoning_gym generators, JSON-lines files) with disjoint splits.
- ``jsonl``: ``read_jsonl``, the JSON-lines reader behind every data file.
- ``verify``: answer extraction and time-limited math answer checking.
- ``math``: ``MathEnv``, single-turn math questions.
- ``tools``: ``Tool``, tools built from typed Python functions (schema, validation, timeouts).
- ``tool_calls``: ``ToolCallFormat``s (Hermes ``<tool_call>``, plain JSON) that read calls
  out of assistant text and write tool results back as messages.
- ``tool_env``: ``ToolEnv``, the multi-turn tool-use base (tasks + tools + a verifier).
- ``tool_lookup``: ``ToolLookupEnv``, catalog questions that need ``lookup`` + ``calculator``.
- ``bfcl``: ``BFCLEnv``, the Berkeley Function Calling Leaderboard's single-turn categories.
- ``function_call``: ``FunctionCallEnv``, procedural function-calling requests with gold calls
  (``call_mismatch`` scores them); ``function_catalog``: the functions they are drawn from.
- ``code``: ``CodeEnv`` and ``CodeToolEnv``, programs graded by hidden tests in a sandbox.
- ``humaneval``: the 164 HumanEval problems as ``CodeEnv`` / ``CodeToolEnv`` tasks.
- ``search``: ``SearchEnv``, BM25 retrievers (in process or over HTTP) and a generated
  encyclopedia.
- ``errors``: the ``EnvError`` hierarchy.

This package imports no torch and never sees token ids.
"""

from palaestra.envs.bfcl import BFCLEnv
from palaestra.envs.checker import check_env
from palaestra.envs.core import Message, Messages, MessagesSpace, TextEnv, TextSpace
from palaestra.envs.errors import (
    EnvCheckError,
    EnvConfigError,
    EnvError,
    ResetNeededError,
    StepInfoError,
    TaskSourceError,
    ToolArgumentError,
    ToolCallError,
    ToolDefinitionError,
    ToolExecutionError,
    ToolInfraError,
    ToolTimeoutError,
    UnknownEnvError,
    VerifierError,
)
from palaestra.envs.function_call import (
    FunctionCallEnv,
    FunctionCallTask,
    FunctionCallTasks,
    GoldCall,
    call_mismatch,
)
from palaestra.envs.jsonl import read_jsonl
from palaestra.envs.math import MathEnv
from palaestra.envs.registry import make, register, registered_ids
from palaestra.envs.single_turn import SingleTurnEnv
from palaestra.envs.solver import ScriptedSolver, solver_of
from palaestra.envs.step_info import EnvStopReason, StepInfo
from palaestra.envs.tasks import JsonlSource, ReasoningGymSource, Task, TaskSource, parse_source
from palaestra.envs.tool_calls import (
    HermesFormat,
    JsonFormat,
    ParsedTurn,
    ToolCall,
    ToolCallFormat,
    ToolResult,
    get_format,
)
from palaestra.envs.tool_env import EpisodeStats, ToolEnv
from palaestra.envs.tool_lookup import LookupTasks, ToolLookupEnv, calculator
from palaestra.envs.tools import Tool, tool
from palaestra.envs.verify import AnswerFallback, MathVerifier, Verdict, extract_answer

__all__ = [
    "AnswerFallback",
    "BFCLEnv",
    "EnvCheckError",
    "EnvConfigError",
    "EnvError",
    "EnvStopReason",
    "EpisodeStats",
    "FunctionCallEnv",
    "FunctionCallTask",
    "FunctionCallTasks",
    "GoldCall",
    "HermesFormat",
    "JsonFormat",
    "JsonlSource",
    "LookupTasks",
    "MathEnv",
    "MathVerifier",
    "Message",
    "Messages",
    "MessagesSpace",
    "ParsedTurn",
    "ReasoningGymSource",
    "ResetNeededError",
    "ScriptedSolver",
    "SingleTurnEnv",
    "StepInfo",
    "StepInfoError",
    "Task",
    "TaskSource",
    "TaskSourceError",
    "TextEnv",
    "TextSpace",
    "Tool",
    "ToolArgumentError",
    "ToolCall",
    "ToolCallError",
    "ToolCallFormat",
    "ToolDefinitionError",
    "ToolEnv",
    "ToolExecutionError",
    "ToolInfraError",
    "ToolLookupEnv",
    "ToolResult",
    "ToolTimeoutError",
    "UnknownEnvError",
    "Verdict",
    "VerifierError",
    "calculator",
    "call_mismatch",
    "check_env",
    "extract_answer",
    "get_format",
    "make",
    "parse_source",
    "read_jsonl",
    "register",
    "registered_ids",
    "solver_of",
    "tool",
]
