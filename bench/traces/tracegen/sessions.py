"""Session models shared by the shapes: multi-turn chats, agent tasks,
single-shot requests. Parameters are chosen per shape (shapes.py) and
documented with their sources in bench/traces/README.md."""
from dataclasses import dataclass

from .sampling import lognormal_tokens

# Seconds per generated token between a turn's arrival and the end of its
# answer (a 30 ms inter-token latency; chosen: the next turn cannot start
# before the answer is out, and any TBT in the tens of ms gives the same
# order, negligible next to think times).
DECODE_S_PER_TOKEN = 0.03
# A conversation stops once its prompt reaches the 128k-token context.
MAX_PROMPT_TOKENS = 131072


@dataclass(frozen=True)
class Lengths:
    """Lognormal token lengths: median and sigma of the log."""
    median: int
    sigma: float

    def draw(self, rng, low=1):
        return lognormal_tokens(rng, self.median, self.sigma, low=low)


# Output lengths (FAST'25 section 4.2, Figure 5: mean output 182 tokens,
# long-tailed): lognormal with median 90 and sigma 1.2 has mean 185.
OUTPUT = Lengths(90, 1.2)


@dataclass(frozen=True)
class Chat:
    first_message: Lengths
    followup: Lengths
    p_second: float            # P(a second turn | first turn)
    p_next: float              # P(another turn | a later turn)
    think_mean_s: float        # mean of the exponential gap between turns
    regenerate: float = 0.05   # P(a turn re-sends the previous prompt unchanged)
    output: Lengths = OUTPUT
    # When set, short answers make another turn likelier and long ones less
    # likely (the shared synthetic trace has such a coupling); off unless a
    # shape says otherwise.
    return_coupling: bool = False


def _coupled(p, output_length):
    if output_length < 64:
        return min(0.95, p * 1.6)
    if output_length >= 256:
        return p * 0.4
    return p


def chat_session(w, t_s, prefix, chat, until_s=None, **labels):
    """A conversation: each turn re-sends the conversation so far (prompt,
    answer, new user message) after a think time. No turn comes at or after
    `until_s` (default: the trace's end)."""
    rng, session = w.rng, w.session()
    until_s = w.end_s if until_s is None else until_s
    segments = list(prefix) + [w.segment(chat.first_message.draw(rng))]
    answer = None
    for turn in range(10_000):
        output_length = chat.output.draw(rng)
        w.emit(t_s, segments, output_length, session=session, turn=turn, **labels)
        p = chat.p_second if turn == 0 else chat.p_next
        if chat.return_coupling:
            p = _coupled(p, output_length)
        if rng.random() >= p:
            return
        answer = output_length
        t_s += output_length * DECODE_S_PER_TOKEN + rng.expovariate(1.0 / chat.think_mean_s)
        if t_s >= until_s:
            return
        if rng.random() >= chat.regenerate:
            segments = segments + [w.segment(answer), w.segment(chat.followup.draw(rng))]
        if sum(length for _, length in segments) > MAX_PROMPT_TOKENS:
            return


@dataclass(frozen=True)
class Agent:
    task: Lengths              # the user's task statement
    call: Lengths              # the model's output per step (a tool call)
    tool_result: Lengths       # what the tool returns, appended to the history
    p_step: float              # P(another step | a step)
    tool_latency_mean_s: float # mean of the exponential gap between steps
    p_branch: float            # P(a step of the main line forks a second continuation)
    p_branch_step: float       # P(another step | a step of a fork)
    p_user_wait: float = 0.0   # P(a step waits for the user instead of a tool)
    user_think_mean_s: float = 0.0


def agent_task(w, t_s, prefix, agent, **labels):
    """A tool loop: each step re-sends the history plus the last call and its
    result. A fork (two continuations of one history: parallel tool calls,
    a retried step) runs beside the main line and ends on its own."""
    rng, session = w.rng, w.session()
    segments = list(prefix) + [w.segment(agent.task.draw(rng))]
    forks = 0

    def run(t_s, segments, p_step, branch):
        nonlocal forks
        for step in range(10_000):
            call = agent.call.draw(rng)
            w.emit(t_s, segments, call, session=session, turn=step, branch=branch, **labels)
            if rng.random() >= p_step:
                return
            wait = (agent.user_think_mean_s if rng.random() < agent.p_user_wait
                    else agent.tool_latency_mean_s)
            t_s += call * DECODE_S_PER_TOKEN + rng.expovariate(1.0 / wait)
            if t_s >= w.end_s or sum(length for _, length in segments) > MAX_PROMPT_TOKENS:
                return
            if branch == 0 and rng.random() < agent.p_branch:
                forks += 1
                other = segments + [w.segment(agent.call.draw(rng)),
                                    w.segment(agent.tool_result.draw(rng))]
                run(t_s + rng.expovariate(1.0), other, agent.p_branch_step, forks)
            segments = segments + [w.segment(call), w.segment(agent.tool_result.draw(rng))]

    run(t_s, segments, agent.p_step, 0)


def single_request(w, t_s, prefix, message, output=OUTPUT, **labels):
    """One request that no later turn follows (an API call, a one-shot document)."""
    segments = list(prefix) + [w.segment(message.draw(w.rng))]
    w.emit(t_s, segments, output.draw(w.rng), session=w.session(), turn=0, **labels)
