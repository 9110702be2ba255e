"""SearchEnv, BM25 retrieval, answer scoring, the generated encyclopedia and the expert
solver, in-process."""

from __future__ import annotations

import json

import pytest

from palaestra.envs import check_env, make, solver_of
from palaestra.envs.errors import EnvConfigError, TaskSourceError
from palaestra.envs.search import (
    BM25Retriever,
    Document,
    Encyclopedia,
    EncyclopediaOracle,
    IndexNotFoundError,
    RetrievalError,
    SearchEnv,
    exact_match,
    normalize_text,
    token_f1,
    write_corpus,
)

DOCS = [
    Document("a", "Orvane", "Orvane is a city on the Kell river."),
    Document("b", "Kell", "The Kell is a river that flows past Orvane and Dusk."),
    Document("c", "Dusk", "Dusk is a town of salt traders."),
]


def search_call(query: str) -> str:
    arguments = {"name": "search", "arguments": {"query": query}}
    return f"<tool_call>\n{json.dumps(arguments)}\n</tool_call>"


# --------------------------------------------------------------------------- retrieval


async def test_bm25_ranks_by_score_and_drops_documents_matching_no_term():
    retriever = BM25Retriever.build(DOCS)
    found = await retriever.search("Orvane", 3)
    assert [d.id for d in found] == [
        "a",
        "b",
    ]  # title + text beat a single mention; "c" has no match
    assert found[0].score > found[1].score > 0
    assert await retriever.search("zebra", 3) == []
    twin = Document("d", DOCS[2].title, DOCS[2].text)
    tied = BM25Retriever.build([twin, *DOCS])  # equal scores: the earlier document first
    assert [d.id for d in await tied.search("salt", 2)] == ["d", "c"]


async def test_a_saved_index_loads_and_answers_the_same(tmp_path):
    built = BM25Retriever.build(DOCS)
    built.save(tmp_path / "index")
    loaded = BM25Retriever.load(tmp_path / "index")
    for query in ("Orvane", "river salt", "Dusk"):
        assert await loaded.search(query, 2) == await built.search(query, 2)


def test_loading_a_missing_index_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexNotFoundError, match=r"palaestra search index CORPUS\.jsonl"):
        BM25Retriever.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match=r"lacks params\.index\.json"):
        BM25Retriever.load(tmp_path / "empty")


@pytest.mark.parametrize(("query", "k"), [("", 3), ("  ", 3), ("Orvane", 0), ("Orvane", 101)])
def test_bad_search_requests_are_refused(query, k):
    with pytest.raises(RetrievalError):
        BM25Retriever.build(DOCS).search_now(query, k)


# ---------------------------------------------------------------------------- scoring


def test_normalisation_exact_match_and_token_f1_by_hand():
    assert normalize_text("  The Kell River!") == "kell river"
    assert exact_match("the Kell river.", ["Kell River"]) == 1.0
    assert exact_match("Kell", ["Kell River"]) == 0.0
    # "kell" against "kell river": precision 1, recall 1/2, F1 = 2/3
    assert token_f1("Kell", ["Kell River"]) == pytest.approx(2 / 3)
    # best over the gold answers
    assert token_f1("Kell", ["Dusk", "Kell River", "Kell"]) == 1.0
    assert token_f1("salt", ["Kell"]) == 0.0


def test_the_reward_mixes_exact_match_and_f1_and_reports_both():
    env = SearchEnv(split="test", f1_weight=0.5)
    env.reset(options={"task_index": 0})
    gold = env.task.answer
    _, reward, terminated, _, info = env.step(f"\\boxed{{{gold} Zzyx}}")
    assert terminated
    assert reward == pytest.approx(0.5 * 0 + 0.5 * 2 / 3)
    assert info["reward_components"] == {
        "correct": reward,
        "exact_match": 0.0,
        "f1": pytest.approx(2 / 3),
    }
    assert info["success"] is False


@pytest.mark.parametrize(
    ("extraction", "reply", "correct"),
    [
        ("boxed", "It is \\boxed{GOLD}.", True),
        ("boxed", "It is GOLD.", False),
        ("answer_tag", "<answer>x</answer> then <answer>GOLD</answer>", True),
        ("answer_tag", "\\boxed{GOLD}", False),
        ("whole_reply", "GOLD", True),
    ],
)
def test_answer_extraction_is_configurable(extraction, reply, correct):
    env = SearchEnv(split="test", answer_extraction=extraction)
    env.reset(options={"task_index": 1})
    _, reward, *_ = env.step(reply.replace("GOLD", env.task.answer))
    assert reward == float(correct)


def test_a_bad_answer_extraction_is_refused_with_the_allowed_values():
    with pytest.raises(EnvConfigError, match="answer_tag"):
        SearchEnv(answer_extraction="last_line")


# ------------------------------------------------------------------------ the env


def test_search_env_passes_check_env():
    check_env(make("palaestra/Search-v0"))


def test_results_carry_document_ids_and_are_clipped():
    env = SearchEnv(split="test", top_k=2, max_doc_chars=40)
    env.reset(options={"task_index": 0})
    observation, reward, terminated, truncated, _ = env.step(
        search_call(env.task.metadata["subject"])
    )
    content = observation[0]["content"]
    headers = [line for line in content.splitlines() if line.startswith("[wiki-")]
    assert len(headers) == 2
    assert all(len(line) <= 40 for line in content.splitlines() if not line.startswith("["))
    assert (reward, terminated, truncated) == (0.0, False, False)


def test_searches_past_the_query_budget_get_an_error_result():
    env = SearchEnv(split="test", max_queries=1, max_turns=5)
    env.reset(options={"task_index": 0})
    env.step(search_call("Orvane"))
    observation, _, _, _, info = env.step(search_call("Kell"))
    assert observation[0]["content"].startswith("Error: the budget of 1 tool calls")
    assert info["tool_errors"] == 1


def test_an_empty_query_is_the_models_mistake_not_an_infrastructure_failure():
    env = SearchEnv(split="test")
    env.reset(options={"task_index": 0})
    observation, _, terminated, truncated, info = env.step(search_call(" "))
    assert "the query is empty" in observation[0]["content"]
    assert not (terminated or truncated) and info["tool_exceptions"] == 1


def test_corpus_and_question_files(tmp_path):
    write_corpus(DOCS, tmp_path / "corpus.jsonl")
    lines = [
        {"question": f"Which river flows past Orvane? ({i})", "answers": ["Kell", "the Kell river"]}
        for i in range(40)
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    env = SearchEnv(corpus=str(tmp_path / "corpus.jsonl"), questions=str(tmp_path / "q.jsonl"))
    env.reset(seed=0)
    observation, *_ = env.step(search_call("Orvane"))
    assert observation[0]["content"].startswith("[a] Orvane\n")
    _, reward, *_ = env.step("\\boxed{The Kell River}")  # any gold answer counts
    assert reward == 1.0
    (tmp_path / "bad.jsonl").write_text('{"question": "Who?", "answer": "Kell"}\n')
    with pytest.raises(TaskSourceError, match=r"bad.jsonl:1: .*'answers'"):
        SearchEnv(corpus=str(tmp_path / "corpus.jsonl"), questions=str(tmp_path / "bad.jsonl"))


def test_only_one_document_source_may_be_given(tmp_path):
    with pytest.raises(EnvConfigError, match="at most one document source"):
        SearchEnv(corpus="c.jsonl", retriever_url="http://127.0.0.1:1")


def test_train_and_test_questions_never_overlap():
    train, test = SearchEnv(split="train"), SearchEnv(split="test")
    train_questions = {train.tasks[i].question for i in range(train.num_tasks)}
    test_questions = {test.tasks[i].question for i in range(test.num_tasks)}
    assert test_questions and not train_questions & test_questions
    assert len(train_questions) + len(test_questions) == len(Encyclopedia.generate(0).questions)


# --------------------------------------------------------------------- the encyclopedia


def test_the_encyclopedia_is_seeded_and_has_single_and_multi_hop_questions():
    world = Encyclopedia.generate(3)
    assert world == Encyclopedia.generate(3)
    assert world.documents != Encyclopedia.generate(4).documents
    assert {q.hops for q in world.questions} == {1, 2}
    assert len({d.title for d in world.documents}) == len(world.documents)
    corpus = " ".join(d.text for d in world.documents)
    assert all(q.answer in corpus for q in world.questions)


async def play(env: SearchEnv, policy, task_index: int) -> tuple[float, dict]:
    await env.areset(options={"task_index": task_index})
    task, results = env.task, []
    while True:
        action = policy(task, results)
        observation, reward, terminated, truncated, info = await env.astep(action)
        if terminated or truncated:
            return reward, info
        results.append(observation[0]["content"])


async def score(env: SearchEnv, policy) -> tuple[float, list[dict]]:
    """The mean reward of ``policy`` over every task of the env's split, and the last infos."""
    outcomes = [await play(env, policy, i) for i in range(env.num_tasks)]
    return sum(reward for reward, _ in outcomes) / len(outcomes), [info for _, info in outcomes]


async def test_the_oracle_searcher_scores_at_least_95_percent_and_guessing_near_zero():
    oracle = EncyclopediaOracle(search_call)

    def searcher(task, results):
        return oracle.reply(task.metadata["subject"], tuple(task.metadata["relations"]), results)

    def guesser(task, results):  # a plausible answer of the right kind, without searching
        return (
            "\\boxed{1700}" if "year" in task.question else f"\\boxed{{{task.metadata['subject']}}}"
        )

    for split in ("train", "test"):
        env = SearchEnv(split=split)
        accuracy, infos = await score(env, searcher)
        assert accuracy >= 0.95, split
        assert all(info["tool_calls"] in (1, 2) for info in infos)
        guessed, _ = await score(env, guesser)
        assert guessed <= 0.02


# ------------------------------------------------------------------------ the expert


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_expert_solves_the_builtin_questions_through_step(split):
    env = make("palaestra/Search-v0", split=split)
    assert solver_of(env) is env.unwrapped
    infos = []
    for task_index in range(100):
        env.reset(options={"task_index": task_index})
        while True:
            action = env.unwrapped.expert_action()
            *_, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        infos.append(info)
        assert action.startswith("\\boxed{")  # the last message answers

    assert all(info["success"] for info in infos)
    assert {info["tool_calls"] for info in infos} == {1, 2}  # single- and multi-hop
    assert all(info["tool_errors"] == 0 for info in infos)


def test_questions_from_a_file_have_no_expert(tmp_path):
    write_corpus(DOCS, tmp_path / "corpus.jsonl")
    lines = [
        {"question": f"Which river flows past Orvane? ({i})", "answers": ["Kell"]}
        for i in range(40)
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    env = SearchEnv(corpus=str(tmp_path / "corpus.jsonl"), questions=str(tmp_path / "q.jsonl"))
    env.reset(seed=0)
    with pytest.raises(EnvConfigError, match="only the built-in questions"):
        env.expert_action()
