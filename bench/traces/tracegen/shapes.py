"""The suite's shapes: one generative model each (bench/traces/README.md
gives every parameter's source). A shape is a function (rng, scale) ->
Workload; `scale` shortens the hour the trace covers and the populations
that grow with it (documents, hot prompts), not the per-request model."""
import dataclasses

from .sampling import Zipf, bursty_poisson
from .sessions import Agent, Chat, Lengths, agent_task, chat_session, single_request
from .workload import Workload

HOUR_S = 3600.0  # the published Mooncake trace covers one hour

# Think time between a person's turns: exponential with P(gap < 10 min) =
# 0.8, i.e. mean 600 / ln 5 = 373 s (ATC'25: 80% of reuses within 10 minutes
# in the to-C trace). Programmatic callers: P(gap < 10 s) = 0.8, mean 6.2 s
# (ATC'25: within 10 seconds in the to-B trace).
HUMAN_THINK_S = 373.0
MACHINE_GAP_S = 6.2

# A chat on top of whatever prefix the shape gives it.
CHAT = Chat(first_message=Lengths(2000, 1.5), followup=Lengths(300, 1.0),
            p_second=0.4, p_next=0.75, think_mean_s=HUMAN_THINK_S)
API_INPUT = Lengths(800, 1.2)


def _window(rng, scale, rate_per_s, start=0.0, end=1.0):
    end_s = HOUR_S * scale
    return bursty_poisson(rng, rate_per_s, start * end_s, end * end_s)


def _prompt(w, length):
    return [w.segment(length)]


def shared_system_prompt(rng, scale):
    """Every request starts with one system prompt (2 full blocks and part
    of a third); multi-turn chats on top."""
    w = Workload(rng, HOUR_S * scale)
    system = _prompt(w, 1100)
    for t in _window(rng, scale, 0.65):
        chat_session(w, t, system, CHAT, kind="chat")
    return w


def multi_tenant(rng, scale):
    """Four tenants, Zipf(1) popular; each has a preamble shared by its six
    system prompts (Zipf(1.2) popular within the tenant). Half the sessions
    are single-turn API calls, half chats whose next turn is likelier after
    a short answer (the one shape with that coupling)."""
    w = Workload(rng, HOUR_S * scale)
    tenants = []
    for _ in range(4):
        preamble = w.segment(rng.randint(600, 1500))
        tenants.append([[preamble, w.segment(Lengths(1500, 0.8).draw(rng))] for _ in range(6)])
    tenant_pick, prompt_pick = Zipf(4, 1.0), Zipf(6, 1.2)
    chat = dataclasses.replace(CHAT, return_coupling=True)
    for t in _window(rng, scale, 1.1):
        tenant = tenant_pick.draw(rng)
        prompt = tenants[tenant][prompt_pick.draw(rng)]
        if rng.random() < 0.5:
            single_request(w, t, prompt, API_INPUT, kind="api", tenant=tenant)
        else:
            chat_session(w, t, prompt, chat, kind="chat", tenant=tenant)
    return w


def rag(rng, scale):
    """A shared instruction prompt, then 2-5 retrieved documents in rank
    order drawn from a Zipf(0.9) corpus, then the question; follow-up turns
    as in a chat."""
    w = Workload(rng, HOUR_S * scale)
    instruction = _prompt(w, 700)
    corpus_size = max(100, int(3000 * scale))
    documents = [w.segment(Lengths(1200, 0.6).draw(rng, low=512)) for _ in range(corpus_size)]
    popularity = Zipf(corpus_size, 0.9)
    chat = Chat(first_message=Lengths(60, 0.8), followup=Lengths(120, 1.0),
                p_second=0.3, p_next=0.6, think_mean_s=HUMAN_THINK_S)
    for t in _window(rng, scale, 0.9):
        picked = popularity.draw_distinct(rng, rng.randint(2, 5))
        chat_session(w, t, instruction + [documents[d] for d in picked], chat,
                     kind="rag", doc=picked[0])
    return w


AGENT = Agent(task=Lengths(500, 1.0), call=Lengths(80, 0.8), tool_result=Lengths(400, 1.2),
              p_step=0.88, tool_latency_mean_s=MACHINE_GAP_S, p_branch=0.1, p_branch_step=0.7,
              p_user_wait=0.15, user_think_mean_s=HUMAN_THINK_S)


def _tool_definitions(w, rng, count):
    return [_prompt(w, Lengths(5000, 0.4).draw(rng, low=2048)) for _ in range(count)]


def agent(rng, scale):
    """Agent tasks of three kinds (Zipf(1) popular), each kind with its own
    long tool-definition prefix; steps append a call and a short result,
    seconds apart, except that a step now and then waits for the user."""
    w = Workload(rng, HOUR_S * scale)
    tools, pick = _tool_definitions(w, rng, 3), Zipf(3, 1.0)
    for t in _window(rng, scale, 0.25):
        kind = pick.draw(rng)
        agent_task(w, t, tools[kind], AGENT, kind="agent", tools=kind)
    return w


SCAN_DOCUMENT = Lengths(12000, 0.7)


def _hot_prompts(w, rng, scale, count):
    return [_prompt(w, Lengths(2500, 0.6).draw(rng)) for _ in range(max(8, int(count * scale)))]


def scan(rng, scale):
    """35% of requests are one-shot long documents (never reused, no shared
    prefix); the rest are single-turn requests on a hot set of 600 prompts
    (Zipf(0.8)) with a short unique suffix."""
    w = Workload(rng, HOUR_S * scale)
    hot = _hot_prompts(w, rng, scale, 600)
    pick = Zipf(len(hot), 0.8)
    for t in _window(rng, scale, 1.7):
        if rng.random() < 0.35:
            single_request(w, t, [], SCAN_DOCUMENT, kind="scan")
        else:
            single_request(w, t, hot[pick.draw(rng)], Lengths(200, 1.0), kind="hot")
    return w


def drift(rng, scale):
    """First half: chats on one shared system prompt (long think times,
    every request reuses a prefix). Second half: agent loops on other tool
    prefixes (seconds between steps) and one-shot scans. Nothing of the
    first half's prefixes returns in the second."""
    w = Workload(rng, HOUR_S * scale)
    half_s = HOUR_S * scale / 2
    system = _prompt(w, 1100)
    # Rates: about as many requests in each half (chats cut at the switch
    # average 1.9 requests, an arrival of the second half 3.8).
    for t in _window(rng, scale, 1.5, 0.0, 0.5):
        chat_session(w, t, system, CHAT, until_s=half_s, kind="chat", phase=0)
    tools, pick = _tool_definitions(w, rng, 3), Zipf(3, 0.6)
    for t in _window(rng, scale, 0.75, 0.5, 1.0):
        if rng.random() < 0.6:
            single_request(w, t, [], SCAN_DOCUMENT, kind="scan", phase=1)
        else:
            agent_task(w, t, tools[pick.draw(rng)], AGENT, kind="agent", phase=1)
    return w


def api_templates(rng, scale):
    """Variant: single-turn API requests only, on 300 templates (Zipf(1)),
    each with a unique input (ATC'25's to-B trace: <0.1% multi-turn)."""
    w = Workload(rng, HOUR_S * scale)
    templates = _hot_prompts(w, rng, scale, 300)
    pick = Zipf(len(templates), 1.0)
    for t in _window(rng, scale, 3.0):
        single_request(w, t, templates[pick.draw(rng)], Lengths(700, 1.2), kind="api")
    return w


SHAPES = {
    "shared-system-prompt": shared_system_prompt,
    "multi-tenant": multi_tenant,
    "rag": rag,
    "agent": agent,
    "scan": scan,
    "drift": drift,
    "api-templates": api_templates,
}
