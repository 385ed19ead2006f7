"""Scoring text with the training machinery: log Pr(y|x) per turn from ONE forward pass.

log Pr([x, y]) = log Pr(x) + log Pr(y | x): one pass over the whole conversation gives every
token's log-probability given everything before it, so each message's term, the response total
(the trained tokens) and the prompt total come from the same pass, packed like training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from onepass.data.chat_template import ChatTemplate
from onepass.data.tree import TokenPath, Tree, merge_paths, tree_example
from onepass.data.formats import to_conversation
from onepass.data.render import (as_the_template_sees_it, find_rendered, mask_tokens, render_conversation,
                                 tokenize_rendered)
from onepass.data.types import (ChatConversation, Conversation, Example, RawConversation, Record, RenderedText,
                                RenderOptions)
from onepass.errors import DataError, OnepassError
from onepass.train.batch import collate
from onepass.train.model import device_of, evaluating
from onepass.train.loss import STOCK_HEAD_LOSS, HeadLoss


@dataclass(frozen=True)
class ScoredText:
    """One rendered conversation: tokens, which are trained, which message each token belongs to, and
    whether it is that message's own text (`body`) or the template's around it (role header,
    generation prompt, untrained end-of-turn). A trained message's body is exactly its trained tokens."""

    example: Example
    message_of_token: np.ndarray  # message index per token
    body: np.ndarray  # bool per token
    roles: tuple[str, ...]
    trained_messages: tuple[bool, ...]


def _message_ends(conversation: Conversation, template: ChatTemplate, text: str) -> list[int]:
    """Character where each message's part of `text` ends (template tokens go with the message they follow)."""
    if isinstance(conversation, RawConversation):
        ends, position = [], 0
        for piece, _ in conversation.segments:
            position += len(piece)
            ends.append(position)
        ends[-1] = len(text)
        return ends
    template, messages, _ = as_the_template_sees_it(conversation, template)  # its tools, its kwargs
    ends = []
    for index in range(len(messages)):
        prefix = template.render(messages[:index + 1]).rstrip()
        ends.append(len(prefix) if text.startswith(prefix) else (ends[-1] if ends else 0))
    ends[-1] = len(text)
    return ends


def render_for_scoring(conversations: list[Conversation], tokenizer: Any, template: ChatTemplate,
                       options: RenderOptions) -> list[ScoredText]:
    rendered = []
    for conversation in conversations:
        result = render_conversation(conversation, template, options, tokenizer.eos_token)
        if result.split:
            raise OnepassError(f"{conversation.source}, {conversation.where}: the chat template rewrites history, "
                               "so one pass cannot score every turn. Fix: use unstable_history: warn.")
        rendered.append(result.texts[0])
    scored = []
    for conversation, item, (ids, offsets) in zip(conversations, rendered, tokenize_rendered(tokenizer, rendered)):
        loss_mask, turn = mask_tokens(item, offsets)
        ends = np.asarray(_message_ends(conversation, template, item.text))
        message_of_token = np.minimum(np.searchsorted(ends, offsets[:, 0], side="right"), len(ends) - 1)
        roles = conversation.roles
        if isinstance(conversation, RawConversation):  # a raw text's pieces say themselves what is trained
            trained = tuple(t for _, t in conversation.segments)
            body = np.ones(len(ids), dtype=bool)  # no template: every token is a piece's own
        else:
            body = _message_bodies(conversation, item.text, offsets, loss_mask, turn, message_of_token, ends)
            trained = tuple(bool(loss_mask[message_of_token == i].any()) for i in range(len(roles)))
        scored.append(ScoredText(Example(ids, loss_mask, turn, conversation.source, conversation.where),
                                 message_of_token, body, roles, trained))
    return scored


def _message_bodies(conversation: ChatConversation, text: str, offsets: np.ndarray, loss_mask: np.ndarray,
                    turn: np.ndarray, message_of_token: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which tokens are a message's own text. A trained turn's are exactly its trained tokens (and they
    are assigned to it); another message's are the tokens of its content as rendered."""
    body = np.zeros(len(offsets), dtype=bool)
    turn_of_message = {m: k for k, m in enumerate(conversation.assistant_indices)}
    for index, message in enumerate(conversation.messages):
        trained = (loss_mask == 1) & (turn == turn_of_message.get(index, -2))
        if trained.any():
            body |= trained
            message_of_token[trained] = index
            continue
        start, end = find_rendered(text, message.content, int(ends[index - 1]) if index else 0)
        if start >= 0:
            body |= (offsets[:, 0] < end) & (offsets[:, 1] > start) & (message_of_token == index)
    return body


def token_logprobs(model: Any, examples: list[Example], batch_tokens: int = 4096,
                   head_loss: HeadLoss = STOCK_HEAD_LOSS) -> list[np.ndarray]:
    """log Pr(token t | tokens < t) for t >= 1 of every (sequence) example, packed into forward passes
    of about `batch_tokens` tokens (each conversation attends only to itself)."""
    return [values[1:] for values in node_logprobs(model, examples, batch_tokens, head_loss)]


def node_logprobs(model: Any, examples: list[Example], batch_tokens: int = 4096,
                  head_loss: HeadLoss = STOCK_HEAD_LOSS) -> list[np.ndarray]:
    """log Pr(node | its ancestors) for every node of every example (trees or sequences; NaN at a root),
    packed into forward passes of about `batch_tokens` tokens; the output layer sees only the rows that
    predict a node, in chunks (`loss.nll_at`, with `head_loss`: the stock one or an acceleration's)."""
    from onepass.train.forward import hidden_states
    from onepass.train.loss import nll_at

    results: list[np.ndarray] = [None] * len(examples)  # type: ignore[list-item]
    with evaluating(model):
        for group in _groups_of_tokens([len(e) for e in examples], batch_tokens):
            batch = collate([examples[i] for i in group]).to(device_of(model))
            hidden = hidden_states(model, batch)[0]
            starts = np.cumsum([0] + [len(examples[i]) for i in group])
            parents = [examples[i].parents for i in group]
            children = [np.flatnonzero(parent >= 0) for parent in parents]
            positions = np.concatenate([start + parent[child]
                                        for start, parent, child in zip(starts, parents, children)])
            nodes = np.concatenate([start + child for start, child in zip(starts, children)])
            nll = nll_at(model, hidden, torch.from_numpy(positions).to(hidden.device),
                         batch.input_ids[0, torch.from_numpy(nodes).to(hidden.device)], head_loss=head_loss)
            values = (-nll.double()).cpu().numpy()
            for index, start, child in zip(group, starts, children):
                results[index] = np.full(len(examples[index]), np.nan)
                results[index][child] = values[:len(child)]
                values = values[len(child):]
    return results


def _groups_of_tokens(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices, longest first, in groups of about `batch_tokens` tokens (one forward pass each)."""
    groups, group, size = [], [], 0
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group.append(index)
        size += lengths[index]
        if size >= batch_tokens:
            groups.append(group)
            group, size = [], 0
    return groups + ([group] if group else [])


def summarise(scored: ScoredText, logprobs: np.ndarray, index: int) -> dict[str, Any]:
    """The output row: per message log-probability and the prompt / response / joint totals."""
    predicted = slice(1, None)  # the first token has no context, so no term
    owner = scored.message_of_token[predicted]
    trained = scored.example.loss_mask[predicted] == 1
    body = scored.body[predicted]
    messages = []
    for i, role in enumerate(scored.roles):
        mine, template_text = (owner == i) & body, (owner == i) & ~body
        messages.append({"role": role, "logprob": float(logprobs[mine].sum()), "num_tokens": int(mine.sum()),
                         "template_logprob": float(logprobs[template_text].sum()),
                         "template_tokens": int(template_text.sum()), "trained": scored.trained_messages[i]})
    response, prompt = float(logprobs[trained].sum()), float(logprobs[~trained].sum())
    num_response, num_prompt = int(trained.sum()), int((~trained).sum())
    return {"index": index, "source": scored.example.source, "where": scored.example.where, "messages": messages,
            "logprob_response": response, "logprob_prompt": prompt, "logprob_joint": response + prompt,
            "num_response_tokens": num_response, "num_prompt_tokens": num_prompt,
            "mean_logprob_response": response / num_response if num_response else None,
            "perplexity_response": float(np.exp(-response / num_response)) if num_response else None}


def score_conversations(model: Any, tokenizer: Any, template: ChatTemplate, conversations: list[Conversation],
                        options: RenderOptions = RenderOptions(unstable_history="warn"),
                        batch_tokens: int = 4096, head_loss: HeadLoss = STOCK_HEAD_LOSS) -> list[dict[str, Any]]:
    scored = render_for_scoring(conversations, tokenizer, template, options)
    logprobs = token_logprobs(model, [s.example for s in scored], batch_tokens, head_loss)
    return [summarise(s, lp, i) for i, (s, lp) in enumerate(zip(scored, logprobs))]


def turn_prefixes(tokenizer: Any, template: ChatTemplate, conversation: ChatConversation,
                  options: RenderOptions = RenderOptions()) -> list[Example]:
    """Each response's own prefix: the conversation up to it, rendered with it as the last message (its
    inference-time render), only it trained."""
    prefixes = []
    for index in conversation.assistant_indices:
        prefix = dataclasses.replace(conversation, messages=tuple(  # its tools and template kwargs kept
            dataclasses.replace(m, train=(i == index) if m.role == "assistant" else None)
            for i, m in enumerate(conversation.messages[:index + 1])))
        as_last = dataclasses.replace(options, unstable_history="split")  # this turn in its own context
        [text] = render_conversation(prefix, template, as_last, tokenizer.eos_token).texts
        [(ids, offsets)] = tokenize_rendered(tokenizer, [text])
        prefixes.append(Example(ids, *mask_tokens(text, offsets), conversation.source, conversation.where))
    return prefixes


def k_pass_turn_logprobs(model: Any, tokenizer: Any, template: ChatTemplate, conversation: ChatConversation,
                         options: RenderOptions = RenderOptions()) -> list[float]:
    """The slow way, for checking: log Pr(response k | its prefix) from a separate pass per turn."""
    return [float(token_logprobs(model, [prefix])[0][prefix.loss_mask[1:] == 1].sum())
            for prefix in turn_prefixes(tokenizer, template, conversation, options)]


def per_turn_token_logprobs(model: Any, tokenizer: Any, template: ChatTemplate, conversations: list[Conversation],
                            scored: list[ScoredText], options: RenderOptions, batch_tokens: int = 4096,
                            head_loss: HeadLoss = STOCK_HEAD_LOSS) -> list[np.ndarray]:
    """`token_logprobs` for a model that is not prefix-consistent (`check.PackingCheck`): each token from a
    pass over its turn's own prefix (`turn_prefixes`: up to the end of the first response at or after it),
    the tokens after the last response from the whole conversation. Each response's value then equals
    one pass per turn, by construction."""
    examples, cuts = [], []
    for conversation, item in zip(conversations, scored):
        whole = item.example
        ends = []
        if isinstance(conversation, ChatConversation):
            for prefix in turn_prefixes(tokenizer, template, conversation, options):
                if not np.array_equal(prefix.input_ids, whole.input_ids[:len(prefix)]):
                    raise OnepassError(f"{conversation.source}, {conversation.where}: a response's own render is "
                                       "not the start of the whole conversation's tokens, so its prefix cannot be "
                                       "scored alone here. Fix: score with --one-pass.")
                ends.append(len(prefix))
        ends = sorted(set(end for end in ends if end < len(whole))) + [len(whole)]
        cuts.append(ends)
        examples += [dataclasses.replace(whole, input_ids=whole.input_ids[:end], loss_mask=whole.loss_mask[:end],
                                         turn=whole.turn[:end]) for end in ends]
    values = iter(token_logprobs(model, examples, batch_tokens, head_loss))
    results = []
    for ends in cuts:  # token t's value is at t - 1: take [previous end - 1, end - 1) from the pass to `end`
        result, start = np.empty(ends[-1] - 1), 0
        for end in ends:
            result[start:end - 1] = next(values)[start:end - 1]
            start = end - 1
        results.append(result)
    return results


def turn_logprobs(scored: ScoredText, logprobs: np.ndarray) -> list[float]:
    """log Pr(response k | everything before it), from the one-pass token log-probabilities."""
    turns = scored.example.turn[1:]
    trained = scored.example.loss_mask[1:] == 1
    return [float(logprobs[trained & (turns == k)].sum()) for k in sorted(set(turns[trained].tolist()))]


def candidate_conversations(record: dict[str, Any], source: str, where: str) -> list[Conversation]:
    """One conversation per candidate of a {prompt, completions: [...]} row."""
    completions = record.get("completions")
    if not isinstance(completions, list) or not completions or not all(isinstance(c, str) for c in completions):
        raise DataError(source, where, "completions", "expected a non-empty list of strings",
                        'give "completions": ["candidate 1", "candidate 2", ...]', code="wrong_type")
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        rows = [{"prompt": prompt, "completion": [{"role": "assistant", "content": c}]} for c in completions]
    else:
        rows = [{"prompt": prompt, "completion": c} for c in completions]
    return [to_conversation(Record(source, where, row), "prompt_completion") for row in rows]


def rank_candidates(model: Any, tokenizer: Any, template: ChatTemplate, records: list[Any],
                    batch_tokens: int = 4096, head_loss: HeadLoss = STOCK_HEAD_LOSS) -> list[dict[str, Any]]:
    """Score log Pr(completion | prompt) for every candidate and rank by sum and by per-token mean.
    A row's candidates are one tree: the prompt once, each completion a branch, one forward pass."""
    trees = [candidate_tree(candidate_conversations(r.data, r.source, r.where), tokenizer, template)
             for r in records]
    logprobs = node_logprobs(model, [tree_example(tree) for tree in trees], batch_tokens, head_loss)
    results = []
    for index, (record, tree, values) in enumerate(zip(records, trees, logprobs)):
        candidates = []
        for completion, nodes, trained in zip(record.data["completions"], tree.paths, tree.trained_on_path):
            total, count = float(values[nodes[trained]].sum()), int(trained.sum())
            candidates.append({"completion": completion, "logprob": total, "num_tokens": count,
                               "mean_logprob": total / count if count else None})
        results.append({"index": index, "candidates": candidates,
                        "best_by_sum": max(range(len(candidates)), key=lambda i: candidates[i]["logprob"]),
                        "best_by_mean": max(range(len(candidates)), key=lambda i: candidates[i]["mean_logprob"]),
                        "ranking_by_sum": sorted(range(len(candidates)), key=lambda i: -candidates[i]["logprob"])})
    return results


def candidate_tree(conversations: list[Conversation], tokenizer: Any, template: ChatTemplate) -> Tree:
    """The candidates of one prompt (as `candidate_conversations` gives them) as one token tree."""
    options = RenderOptions(unstable_history="warn")
    rendered = [render_conversation(c, template, options, tokenizer.eos_token).texts[0] for c in conversations]
    paths = [TokenPath(ids, *mask_tokens(item, offsets))
             for item, (ids, offsets) in zip(rendered, tokenize_rendered(tokenizer, rendered))]
    return merge_paths(paths)


def score_file(model: Any, tokenizer: Any, template: ChatTemplate, path: str, loss_on: str = "assistant",
               format_name: str | None = None, batch_tokens: int = 4096, per_turn: bool = False,
               head_loss: HeadLoss = STOCK_HEAD_LOSS) -> tuple[list[dict[str, Any]], list[Conversation]]:
    """Every conversation of a data file (or of records in memory: `records.Rows`) scored
    (`score_rows`)."""
    from onepass.data.prepare import load_conversations
    from onepass.data.stats import Stats

    conversations = load_conversations([path], format_name, "error", Stats(), [])
    return score_rows(model, tokenizer, template, conversations, loss_on, batch_tokens, per_turn, head_loss), \
        conversations


def score_rows(model: Any, tokenizer: Any, template: ChatTemplate, conversations: list[Conversation],
               loss_on: str = "assistant", batch_tokens: int = 4096, per_turn: bool = False,
               head_loss: HeadLoss = STOCK_HEAD_LOSS) -> list[dict[str, Any]]:
    """Every conversation scored from one pass each, with its per-turn values. A conversation whose
    template rewrites history is one tree: each turn scored in its own inference-time context, in the
    same pass. `per_turn`: each turn from a pass over its own prefix instead (`per_turn_token_logprobs`),
    for a model that is not prefix-consistent; each row's `method` says which."""
    options = RenderOptions(loss_on=loss_on, unstable_history="tree")
    results = [render_conversation(c, template, options, tokenizer.eos_token) for c in conversations]
    plain = [i for i, r in enumerate(results) if not r.tree]
    plain_options = RenderOptions(loss_on=loss_on, unstable_history="warn")
    scored = render_for_scoring([conversations[i] for i in plain], tokenizer, template, plain_options)
    if per_turn:
        logprobs = per_turn_token_logprobs(model, tokenizer, template, [conversations[i] for i in plain], scored,
                                           plain_options, batch_tokens, head_loss)
    else:
        logprobs = token_logprobs(model, [s.example for s in scored], batch_tokens, head_loss)
    rows: list[dict[str, Any]] = [{} for _ in conversations]
    method = "per-turn prefix" if per_turn else "one pass"
    for i, item, values in zip(plain, scored, logprobs):
        rows[i] = {**summarise(item, values, i), "turn_logprobs": turn_logprobs(item, values), "method": method}
    trees = [i for i, r in enumerate(results) if r.tree]
    built = [_paths_tree(results[i].texts, tokenizer) for i in trees]
    for i, tree, values in zip(trees, built, node_logprobs(model, [tree_example(t) for t in built], batch_tokens,
                                                           head_loss)):
        rows[i] = {**_summarise_tree(conversations[i], tree, values, i), "method": "one pass (tree)"}
    return rows


def _paths_tree(texts: tuple[RenderedText, ...], tokenizer: Any) -> Tree:
    return merge_paths([TokenPath(ids, *mask_tokens(item, offsets))
                        for item, (ids, offsets) in zip(texts, tokenize_rendered(tokenizer, list(texts)))])


def _summarise_tree(conversation: Conversation, tree: Tree, values: np.ndarray, index: int) -> dict[str, Any]:
    """A history-rewriting conversation's row: each trained turn's log Pr(y_k | its inference-time
    context). A tree holds several contexts, so there is no single prompt or joint probability."""
    turns = [float(values[nodes[trained]].sum()) for nodes, trained in zip(tree.paths, tree.trained_on_path)]
    counts = [int(trained.sum()) for trained in tree.trained_on_path]
    response, num_response = sum(turns), sum(counts)
    messages = [{"role": "assistant", "logprob": value, "num_tokens": count, "trained": True}
                for value, count in zip(turns, counts)]
    return {"index": index, "source": conversation.source, "where": conversation.where, "tree": True,
            "messages": messages, "turn_logprobs": turns, "logprob_response": response,
            "logprob_prompt": None, "logprob_joint": None, "num_response_tokens": num_response,
            "mean_logprob_response": response / num_response if num_response else None,
            "perplexity_response": float(np.exp(-response / num_response)) if num_response else None}


def largest_k_pass_difference(model: Any, tokenizer: Any, template: ChatTemplate, conversations: list[Conversation],
                              rows: list[dict[str, Any]], loss_on: str = "assistant") -> float:
    """Re-score conversations the slow way (one pass per turn); the largest difference in nats."""
    options = RenderOptions(loss_on=loss_on, unstable_history="warn")
    worst = 0.0
    for conversation, row in zip(conversations, rows):
        if isinstance(conversation, ChatConversation):
            slow = k_pass_turn_logprobs(model, tokenizer, template, conversation, options)
            worst = max([worst] + [abs(a - b) for a, b in zip(slow, row["turn_logprobs"])])
    return worst
