"""The PPO phase: one update = rollout -> score -> reference -> advantages -> PPO epochs.

The same update serves the critic-free estimators (ADVANTAGE grpo, rloo, reinforce_pp;
hybrid_ds/algorithms/estimators.py): they sample NUM_GENERATIONS responses per prompt, replace the
value head and GAE at step 4, and train no value head.

Each step is its own function, numbered as in the algorithm (Ziegler et al. 2019; Huang et al.
2024, "The N Implementation Details of RLHF with PPO"). The math is in ppo_math.py; everything
distributed goes through ``ctx.dist`` (hybrid_ds/engine/).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from hybrid_ds.algorithms import estimators as est
from hybrid_ds.algorithms import ppo_math as pm
from hybrid_ds.algorithms import self_play
from hybrid_ds.algorithms import turn_math as tm
from hybrid_ds.algorithms.context import NextBatch, PhaseContext, PhaseTimer
from hybrid_ds.algorithms.samples import (component_metrics, dialogue_metrics, reference_kl_metrics, rollout_metrics,
                                          sample_rows)
from hybrid_ds.config.refs import ref_weights
from hybrid_ds.data import Example, collate_prompts, collate_sft, micro_batches, stop_token_ids
from hybrid_ds.models.heads import untrained_heads_term
from hybrid_ds.models.logprobs import (entropy_from_logits, lm_response_logprobs, logprobs_from_logits,
                                       policy_response_outputs, sequence_inputs)


@dataclass
class Rollout:
    """One rank's share of a PPO batch. B = prompts on this rank, P = prompt length, T = response length."""

    query_ids: torch.Tensor  # (B, P) left-padded prompt ids
    query_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, T) generated ids, pad after EOS
    response_mask: torch.Tensor  # (B, T) float, 1 up to and including the first EOS (ENV: on the policy's tokens)
    ended: torch.Tensor  # (B,) bool, an EOS was generated
    texts: list  # B decoded responses (EOS and pads stripped)
    group: Optional[torch.Tensor] = None  # (B,) long, global id of the prompt each response answers
    scores: Optional[torch.Tensor] = None  # (B,) task reward
    logprobs: Optional[torch.Tensor] = None  # (B, T) old policy log-probs at TEMPERATURE
    ref_logprobs: Optional[torch.Tensor] = None  # (B, T) reference log-probs at TEMPERATURE; REFS: (B, K, T)
    values: Optional[torch.Tensor] = None  # (B, T) old values (ADVANTAGE=gae only)
    rewards: Optional[torch.Tensor] = None  # (B, T) KL-shaped per-token rewards
    kl: Optional[torch.Tensor] = None  # (B, T) per-token KL estimate
    advantages: Optional[torch.Tensor] = None  # (B, T) whitened GAE advantages, or the estimator's
    returns: Optional[torch.Tensor] = None  # (B, T) value targets (gae), discounted returns (reinforce_pp)
    response_attn: Optional[torch.Tensor] = None  # (B, T) float, ENV: 1 on every dialogue token (policy and env)
    dialogues: Optional[list] = None  # ENV: B rollout.multiturn.Dialogue (turns, messages)
    env_rewards: Optional[torch.Tensor] = None  # (B, T) ENV: its per-turn rewards, each on its turn's last token
    components: Optional[dict] = None  # REWARD's weighted_sum components: name -> B scores (Reward.components)

    def select(self, idx: torch.Tensor) -> dict:
        """The tensors of rows ``idx`` (for minibatches)."""
        return {f.name: getattr(self, f.name)[idx] for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor) and f.name != "ended"}


# --------------------------------------------------------------------------------------
# 1. rollout


def has_critic(run: PhaseContext) -> bool:
    """Whether the policy carries a value head (ADVANTAGE=gae; the critic-free estimators build none)."""
    return run.engine.module.v_head is not None


def group_ids(run: PhaseContext, n_prompts: int) -> torch.Tensor:
    """``(n_prompts * K,)`` global group id of each rollout row (rank-major, K = NUM_GENERATIONS): group
    statistics add up across ranks (estimators.py)."""
    prompts = run.dist.rank * n_prompts + torch.arange(n_prompts, device=run.dist.device)
    return prompts.repeat_interleave(run.cfg.ppo.num_generations)


def eos_arg(stops: list) -> object:
    """The stop ids as ``generate`` and the sampler take them: one id, or the list of several."""
    return stops[0] if len(stops) == 1 else stops


def finish_responses(resp: torch.Tensor, stops: list, tok, n_rows: int):
    """Generated ids ``(B, T)`` -> ``(ids with pad after the first stop, mask (B, T), ended (B,), texts)``.

    The mask runs up to and including the first stop id, whatever the ids: a pad id the policy sampled
    mid-response is a token it conditioned on (not padding), so the recomputed forwards must attend to
    it as well. Texts are decoded without the stop ids."""
    if resp.shape[1] == 0:  # degenerate: nothing generated at all
        resp = torch.full((n_rows, 1), tok.eos_token_id, dtype=torch.long, device=resp.device)
    mask, ended = pm.mask_after_eos(resp, stops)
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, tok.pad_token_id))
    texts = tok.batch_decode(resp.masked_fill(torch.isin(resp, torch.tensor(stops, device=resp.device)),
                                              tok.pad_token_id), skip_special_tokens=True)
    return resp, mask, ended, texts


@torch.no_grad()
def generate(run: PhaseContext, examples: list[Example], model=None, seed_tag: str = "rollout") -> Rollout:
    """Sample NUM_GENERATIONS responses per prompt (rows ``i*K .. i*K+K-1`` answer prompt ``i``) with
    the config's sampling settings, stopping at EOS or at the chat template's end of turn
    (``stop_token_ids``, hybrid_ds/data/chat.py). ``model``: a context giving another causal LM to sample
    with, from the seed ``seed_tag`` (a self-play opponent, algorithms/self_play.py), no log-probs/values."""
    cfg, tok, dev = run.cfg, run.tokenizer, run.dist.device
    stops = stop_token_ids(tok)
    eos = eos_arg(stops)
    max_prompt = max(1, cfg.data.maxseq - cfg.gen.max_new_tokens)
    K = cfg.ppo.num_generations
    p_ids, p_mask = (x.to(dev) for x in collate_prompts(examples, tok.pad_token_id, max_prompt))  # once per prompt
    q_ids, q_mask = p_ids.repeat_interleave(K, 0), p_mask.repeat_interleave(K, 0)
    g = cfg.gen
    kwargs = dict(do_sample=True, top_p=g.top_p, top_k=g.top_k, temperature=g.temperature,
                  no_repeat_ngram_size=g.no_repeat_ngram_size, repetition_penalty=g.repetition_penalty,
                  max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens,
                  eos_token_id=eos, pad_token_id=tok.pad_token_id, use_cache=True)
    run.engine.eval()
    # Sampling draws from a seed of (SEED, rank, update), not from whatever state model loading or
    # earlier phases left in the global RNG: placements and resumed runs sample the same tokens.
    torch.manual_seed(run.seed_for(seed_tag, run.counters.ppo_update))
    logprobs = values = None
    with (run.dist.generation_model(run.engine) if model is None else model) as lm:
        if g.sampler.startswith("lean"):  # generate's distribution (lean_exact: its very tokens), test_sampler.py
            from hybrid_ds.rollout.sampler import SamplingSettings, sample

            st = SamplingSettings.from_gen_config(g, eos, tok.pad_token_id)
            v_head = run.engine.module.v_head  # whole here, also under ZeRO-3 (gathered with the LM)
            own_old = old_from_rollout(run) and model is None
            value_fn = (lambda h: v_head(h.to(v_head.weight.dtype))) if own_old and v_head is not None else None
            out = sample(lm, p_ids, p_mask, st, hf_rng=g.sampler == "lean_exact", value_fn=value_fn, repeats=K)
            resp = out.response_ids
            if own_old:
                logprobs, values = out.logprobs, out.values
        else:
            resp = lm.generate(input_ids=q_ids, attention_mask=q_mask, **kwargs)[:, q_ids.shape[1]:]
    resp, mask, ended, texts = finish_responses(resp, stops, tok, q_ids.shape[0])
    return Rollout(q_ids, q_mask, resp, mask, ended, texts, group=group_ids(run, len(examples)), logprobs=logprobs,
                   values=values)


@torch.no_grad()
def generate_dialogues(run: PhaseContext, examples: list[Example]) -> Rollout:
    """ENV: NUM_GENERATIONS dialogues per prompt of up to MAX_TURNS policy turns with the environment
    (hybrid_ds/rollout/multiturn.py), each turn sampled by the lean sampler over the rows still
    talking. The response is the whole dialogue, ``response_attn`` its attention mask and
    ``response_mask`` 1 on the policy's tokens only; ``texts`` are the policy's last turns. Old
    log-probs and values are always recomputed on the whole sequence (step 3)."""
    from hybrid_ds.rollout import multiturn as mt
    from hybrid_ds.rollout.sampler import SamplingSettings, sample

    cfg, tok, dev = run.cfg, run.tokenizer, run.dist.device
    K, pad, g = cfg.ppo.num_generations, tok.pad_token_id, cfg.gen
    stops = stop_token_ids(tok)
    st = SamplingSettings.from_gen_config(g, eos_arg(stops), pad)
    starts = [mt.dialogue_start(e) for e in examples for _ in range(K)]
    max_prompt = max(1, cfg.data.maxseq - g.max_new_tokens)
    prompts = [p[-max_prompt:] for p, _ in starts]
    group = group_ids(run, len(examples))

    def policy_turn(contexts: list, n: int) -> list:  # left-padded contexts -> each row's ids up to its stop
        ids, att = tm.left_pad(contexts, pad, dev)
        out = sample(lm, ids, att, replace(st, max_new_tokens=n, min_new_tokens=min(st.min_new_tokens, n)),
                     hf_rng=g.sampler == "lean_exact")
        lengths = out.response_mask.sum(1).long().tolist()
        return [row[:k] for row, k in zip(out.response_ids.tolist(), lengths)]

    run.engine.eval()
    torch.manual_seed(run.seed_for("rollout", run.counters.ppo_update))  # as generate
    with run.dist.generation_model(run.engine) as lm:
        dialogues = mt.roll_dialogues(policy_turn, mt.load_env(cfg.ppo.env), tok, prompts, [h for _, h in starts],
                                      [e.item for e in examples for _ in range(K)], max_turns=cfg.ppo.max_turns,
                                      max_len=cfg.data.maxseq, max_new_tokens=g.max_new_tokens, stops=stops)
    q_ids, q_mask = tm.left_pad(prompts, pad, dev)
    resp, attn = tm.right_pad([d.ids for d in dialogues], pad, dev)
    actions, _ = tm.right_pad([d.actions for d in dialogues], 0, dev)
    ended = torch.tensor([d.ended for d in dialogues], dtype=torch.bool, device=dev)
    env_rewards = torch.zeros(resp.shape, dtype=torch.float32)
    for r, d in enumerate(dialogues):
        env_rewards[r, d.turn_ends] = torch.tensor(d.turn_rewards)
    clip = cfg.ppo.score_clip
    env_rewards = (env_rewards.clamp(-clip, clip) if clip > 0 else env_rewards).to(dev)
    return Rollout(q_ids, q_mask, resp, actions.float(), ended, [d.turns[-1] for d in dialogues], group=group,
                   response_attn=attn.float(), dialogues=dialogues, env_rewards=env_rewards)


def _attention(ro: Rollout) -> torch.Tensor:
    """The response's attention mask ``(B, T)``: every dialogue token under ENV, else the response mask."""
    return ro.response_mask if ro.response_attn is None else ro.response_attn


def old_from_rollout(run: PhaseContext) -> bool:
    """Whether PPO's old log-probs and values are the sampler's own (OLD_LOGPROBS, docs/config.md).

    They are the same model on the same tokens, computed through the KV cache instead of one
    full forward: equal to float32 rounding (~1e-6, tests/test_sampler.py), which PPO's first
    ratio exp(new - old) cannot tell from 1. In bf16/fp16 the two paths round differently
    (~1e-2), so ``auto`` recomputes there."""
    g = run.cfg.gen
    if g.old_logprobs == "auto":
        return g.sampler.startswith("lean") and run.dist.plan.mixed_precision == "no"
    return g.old_logprobs == "rollout"


# --------------------------------------------------------------------------------------
# 2. score


def score(run: PhaseContext, ro: Rollout, examples: list[Example]) -> None:
    """Task scores ``(B,)`` from the reward on (response, target, prompt, item) for the whole batch;
    ``examples`` has one entry per rollout row (a prompt repeated NUM_GENERATIONS times)."""
    items = [e.item for e in examples]
    if ro.dialogues is not None:  # ENV: the response is the policy's last turn; the item carries the dialogue
        items = [{**it, "dialogue": d.messages} for it, d in zip(items, ro.dialogues)]
    s = run.reward.score_batch(ro.texts, [e.target for e in examples], [e.prompt for e in examples], items)
    ro.components = run.reward.components()  # each component's scores of this batch (empty for one reward)
    s = torch.as_tensor(s, dtype=torch.float32, device=run.dist.device).reshape(-1)
    if not torch.isfinite(s).all():  # the reward's fault policy should have caught this
        bad = int((~torch.isfinite(s)).nonzero()[0])
        raise FloatingPointError(f"reward returned {float(s[bad])} for sample {bad}: {ro.texts[bad][:80]!r}")
    clip = run.cfg.ppo.score_clip
    ro.scores = s.clamp(-clip, clip) if clip > 0 else s


# --------------------------------------------------------------------------------------
# 3. old policy and reference log-probs


@torch.no_grad()
def forward_logprobs(model, ro: Rollout, temperature: float, chunk: int, with_values: bool):
    """Log-probs (and values) ``(B, T)`` of the rollout under ``model``, ``chunk`` rows at a time:
    the policy engine when ``with_values`` (values None without a value head), a plain causal LM (the
    reference) otherwise."""
    ids, att, pos = sequence_inputs(ro.query_ids, ro.query_mask, ro.response_ids, _attention(ro))
    T = ro.response_ids.shape[1]
    critic = with_values and model.module.v_head is not None
    lps, vals = [], []
    for s in range(0, ids.shape[0], chunk):
        sl, resp = slice(s, s + chunk), ro.response_ids[s:s + chunk]
        if with_values:
            logits, v = policy_response_outputs(model, ids[sl], att[sl], pos[sl], T, with_values=critic)
            lps.append(logprobs_from_logits(logits, resp, temperature))
            vals.append(v)
        else:
            lps.append(lm_response_logprobs(model, ids[sl], att[sl], pos[sl], resp, temperature))
    return torch.cat(lps), (torch.cat(vals) if critic else None)


def reference_model(run: PhaseContext, index: int = 0):
    """Context giving colocated reference ``index`` (REFS order; 0 without REFS): a REFS frozen model, or
    the run's own: its frozen copy, or with LoRA (``run.ref`` None) the policy's base, adapters disabled."""
    frozen = run.ref_models[index] if run.ref_models else None
    if frozen is not None:
        return contextlib.nullcontext(frozen)
    return contextlib.nullcontext(run.ref) if run.ref is not None else run.engine.adapters_disabled()


def request_reference(run: PhaseContext, ro: Rollout, index: int = 0):
    """Ask this rank's reference rank for model ``index``'s (REFS order) log-probs; ``.wait()``: ``(B, T)`` fp32."""
    ids, att, _ = sequence_inputs(ro.query_ids, ro.query_mask, ro.response_ids, _attention(ro))
    return run.ref_client.request(ids, att, ro.query_ids.shape[1], ro.response_ids.shape[1],
                                  run.cfg.gen.temperature, ref=index)


def reference_logprobs(run: PhaseContext, ro: Rollout, chunk: int, pending: Optional[list] = None) -> torch.Tensor:
    """Step 3's reference log-probs ``(B, T)``; with REFS ``(B, K, T)``, the K references in REFS order.
    From ``pending`` (:func:`request_reference`'s, one per reference) when the reference has its own
    ranks, else from the colocated references (:func:`reference_model`), ``chunk`` rows at a time."""
    if pending is not None:
        lps = [p.wait().to(ro.response_mask.device) for p in pending]
    else:
        lps = []
        for k in range(max(len(run.cfg.ppo.refs), 1)):
            with reference_model(run, k) as ref:
                lps.append(forward_logprobs(ref, ro, run.cfg.gen.temperature, chunk, with_values=False)[0])
    return torch.stack(lps, 1) if run.cfg.ppo.refs else lps[0]


# --------------------------------------------------------------------------------------
# 4. advantages


def compute_advantages(run: PhaseContext, ro: Rollout) -> None:
    """Per-token rewards (the score on the last token; the KL penalty on every token when KL_IN=reward),
    then ADVANTAGE's estimator, every statistic over all ranks:

    * gae: GAE on the value head's values, advantages whitened;
    * grpo / rloo: each sequence's summed reward against its group (estimators.group_advantages),
      the same advantage on every token of the sequence;
    * reinforce_pp: discounted returns whitened over the batch.

    Under ENV the mask holds the policy's tokens of the whole dialogue: the KL and the score sit on
    them only (the environment's per-turn rewards on each turn's last token), and GAE and the returns
    run over them as one episode, skipping the environment's tokens (turn_math.py).
    """
    c, m = run.cfg.ppo, ro.response_mask
    beta = run.kl_ctl.value if c.kl_in == "reward" else 0.0
    ro.rewards, ro.kl = pm.shape_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, m, beta,
                                         estimator=c.kl_estimator, missing_eos_penalty=c.missing_eos_penalty,
                                         ended_with_eos=ro.ended, ref_weights=ref_weights(run.cfg))
    if ro.env_rewards is not None:  # ENV's per-turn rewards, on the last token of the turns they answer
        ro.rewards = ro.rewards + ro.env_rewards.to(ro.rewards.dtype)
    if c.advantage in est.GROUP_ESTIMATORS:
        seq = ro.rewards.sum(1)
        n_groups = (ro.group.shape[0] // c.num_generations) * run.dist.world
        table = run.dist.all_reduce_sum(est.group_sums(seq, ro.group, n_groups))
        adv = est.group_advantages(seq, ro.group, table, c.advantage, scale_std=c.group_std)
        ro.advantages = adv[:, None] * m
        return
    if c.advantage == "reinforce_pp":
        returns = est.discounted_returns if ro.response_attn is None else tm.returns_over_actions
        ro.returns = returns(ro.rewards, m, c.discount)
        stats = pm.moments_from_sums(run.dist.all_reduce_sum(pm.moment_sums(ro.returns, m)))
        ro.advantages = pm.whiten(ro.returns, m, shift_mean=True, stats=stats)
        return
    if c.whiten_rewards:
        stats = pm.moments_from_sums(run.dist.all_reduce_sum(pm.moment_sums(ro.rewards, m)))
        ro.rewards = pm.whiten(ro.rewards, m, shift_mean=False, stats=stats)
    gae = pm.gae if ro.response_attn is None else tm.gae_over_actions
    adv, ro.returns = gae(ro.rewards, ro.values, m, gamma=c.discount, lam=c.gae_lambda)
    stats = pm.moments_from_sums(run.dist.all_reduce_sum(pm.moment_sums(adv, m)))
    ro.advantages = pm.whiten(adv, m, shift_mean=True, stats=stats)


# --------------------------------------------------------------------------------------
# 5. PPO epochs


def ppo_epochs(run: PhaseContext, ro: Rollout, ptx_examples: Optional[list[Example]]) -> dict:
    """PPO_EPOCHS passes, each reshuffled into minibatches x accumulation; one optimizer step per minibatch.

    Each micro-batch's loss is a token sum divided by the minibatch's global token count (one
    all-reduce for all epochs up front), so accumulation and rank count do not change the update.
    """
    cfg, dist, engine = run.cfg, run.dist, run.engine
    c = cfg.ppo
    B = ro.response_ids.shape[0]
    n_mini = run.batches.ppo.minibatches  # per epoch, the same on every rank
    per_mini = B // n_mini
    gen = torch.Generator().manual_seed(run.seed_for("ppo_perm", run.counters.ppo_update))
    perms = [torch.randperm(B, generator=gen) for _ in range(c.epochs)]
    minis = [p[k * per_mini:(k + 1) * per_mini] for p in perms for k in range(n_mini)]
    local_tokens = torch.stack([ro.response_mask[idx].sum() for idx in minis]).double()
    global_tokens = dist.all_reduce_sum(local_tokens).clamp(min=1.0) / dist.world
    critic, kl_in_loss, ref_w = has_critic(run), c.kl_in == "loss", ref_weights(cfg)
    T = ro.response_ids.shape[1]
    stats: dict[str, list] = {}
    grad_norms, skipped, kept, ptx_losses = [], torch.zeros((), device=dist.device), [], []
    engine.train()
    for step_i, idx in enumerate(minis):
        micros = micro_batches(idx.tolist(), c.grad_accum)
        for j, mb in enumerate(micros):
            boundary = j == len(micros) - 1
            b = ro.select(torch.tensor(mb, device=ro.response_ids.device))
            with engine.no_sync(boundary):
                ids, att, pos = sequence_inputs(b["query_ids"], b["query_mask"], b["response_ids"],
                                                b.get("response_attn", b["response_mask"]))
                logits, values = policy_response_outputs(engine, ids, att, pos, T, with_values=critic)
                logp = logprobs_from_logits(logits, b["response_ids"], cfg.gen.temperature)
                m, n = b["response_mask"], global_tokens[step_i]
                # LOSS_AGG: token_mean is the token sum over the minibatch's count; the others weigh tokens
                w = None if c.loss_agg == "token_mean" else est.token_weights(
                    m, c.loss_agg, per_mini, n, cfg.gen.max_new_tokens)
                guard = pm.ratio_guard(logp.detach(), b["logprobs"], m, c.ratio_guard)
                # An exploding micro-batch contributes exactly zero gradient: its losses read detached
                # model outputs (torch.where hands the branch it did not select a zero gradient; a
                # loss times 0 would not, as inf * 0 is NaN and one such micro-batch would make the
                # whole step non-finite). The other micro-batches of the step still count.
                logp = _cut_if(guard, logp)
                pg, pg_stats = pm.policy_loss(logp, b["logprobs"], b["advantages"], m, c.clip_range, num_tokens=n,
                                              weights=w)
                loss, shares = pg, {"loss/policy": pg}
                if critic:
                    vf, vf_stats = pm.value_loss(_cut_if(guard, values), b["values"], b["returns"], m,
                                                 c.clip_range_value, num_tokens=n, weights=w)
                    loss, shares["loss/value"] = loss + c.vf_coef * vf, vf
                    pg_stats = {**pg_stats, **vf_stats}
                if kl_in_loss:  # GRPO's KL term: beta x k3(pi, ref) (REFS: weighted), aggregated as the policy loss
                    kl = pm.token_mean(pm.weighted_kl(logp, b["ref_logprobs"], ref_w, est.kl_k3), m, n, w)
                    loss, shares["loss/kl"] = loss + run.kl_ctl.value * kl, kl
                if c.entropy_coef > 0:
                    ent = pm.token_mean(entropy_from_logits(_cut_if(guard, logits), cfg.gen.temperature), m, n, w)
                    loss = loss - c.entropy_coef * ent
                loss = torch.where(guard, torch.zeros_like(loss), loss)
                skipped += guard.float()
                if ptx_examples and boundary:
                    ptx = ptx_loss(run, ptx_examples)
                    ptx_losses.append(ptx.detach().float())
                    loss = loss + c.ptx_coef * ptx
                engine.backward(loss + untrained_heads_term(engine.module), boundary)  # HEADS: 0, in the graph
            kept.append((~guard).float())  # a skipped micro-batch's (non-finite) losses are not averaged in
            # pg and vf are this micro-batch's share of the minibatch loss (token sums over the
            # minibatch's count): times the micro-batches per step, their mean is the step's loss,
            # whatever PPO_GRAD_ACCUM (tests/test_ppo_update.py).
            shares = {k: v.detach() * len(micros) for k, v in shares.items()}
            for k, val in {**pg_stats, **shares}.items():
                val = val.detach().float()
                stats.setdefault(k, []).append(torch.where(guard, torch.zeros_like(val), val))
        sched = run.schedules["ppo"]
        grad_norms.append(engine.step({"policy": sched.lr, "value": sched.lr, "heads": 0.0}, sched.momentum))
        sched.step(float(pg.detach()) if sched.name == "reduce_on_plateau" else None)
    n_kept = torch.stack(kept).sum()  # 0 when every micro-batch was skipped: NaN means, a non-finite update
    out = {f"ppo/{k}": torch.stack(v).sum() / n_kept for k, v in stats.items()}
    out["ppo/skipped_microbatches"] = skipped
    if ptx_losses:  # PPO-ptx: the SFT loss term, before its PTX_COEF weight
        out["ppo/loss/ptx"] = torch.stack(ptx_losses).mean()
    out = {k: float(v) for k, v in out.items()}  # one host sync, after all epochs
    # Under fp16 the loss scaler skips a step whose scaled gradients overflowed (and backs its scale
    # off; the guard in TrainEngine.step does the same for any non-finite norm): the norm logged is
    # the mean over the steps applied, and the skipped ones are counted beside it.
    norms = [g for g in grad_norms if g is not None]
    applied = [g for g in norms if math.isfinite(g)]
    out["ppo/grad_norm"] = sum(applied) / len(applied) if applied else float("nan")
    out["ppo/skipped_steps"] = float(len(norms) - len(applied))
    return out


def _cut_if(guard: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged in value; with ``guard`` (0-d bool) no gradient reaches the model through it."""
    return torch.where(guard, x.detach(), x)


def ptx_loss(run: PhaseContext, examples: list[Example]) -> torch.Tensor:
    """PPO-ptx: the SFT token-mean loss of this rank's labelled examples, scaled for rank averaging."""
    from hybrid_ds.algorithms.sft import labelled_ce_sum

    b = collate_sft(examples, run.tokenizer.pad_token_id)
    n_tok = run.dist.all_reduce_sum(torch.tensor([float((b["labels"][:, 1:] != -100).sum())]))[0]
    ce_sum, _ = labelled_ce_sum(run.engine, b, run.dist.device)
    return ce_sum * run.dist.world / n_tok.to(ce_sum.device)


# --------------------------------------------------------------------------------------
# the update


def ppo_update(run: PhaseContext, examples: list[Example], ptx_examples: Optional[list[Example]] = None) -> dict:
    """One PPO update on this rank's prompts; returns metrics reduced across ranks.

    1. generate  2. score  3. reference and old log-probs/values  4. advantages  5. PPO epochs
    6. adapt the KL coefficient (only after a finite update: a skipped one teaches it nothing)
    """
    cfg, dist, timer = run.cfg, run.dist, PhaseTimer()
    # forward_chunk counts prompts (a training micro-batch); each prompt has NUM_GENERATIONS rows
    chunk = run.batches.ppo.forward_chunk * cfg.ppo.num_generations
    # 1. rollout (ENV: whole dialogues with the environment)
    ro = generate_dialogues(run, examples) if cfg.ppo.env else generate(run, examples)
    timer.mark("rollout")
    # (separate reference ranks start on the reference log-probs now, while this rank scores; REFS: one
    # request per reference, in REFS order)
    pending = ([request_reference(run, ro, k) for k in range(max(len(cfg.ppo.refs), 1))]
               if run.ref_client is not None else None)
    if self_play.opponent_step(run, examples, generate):  # a self_play REWARD: its opponent answers too
        timer.mark("self_play_generate")
    # 2. task scores (each prompt's item once per response)
    score(run, ro, [e for e in examples for _ in range(cfg.ppo.num_generations)])
    timer.mark("scoring")
    # 3. reference log-probs, then old policy log-probs and values (no dropout, no grad)
    if pending is None:
        ro.ref_logprobs = reference_logprobs(run, ro, chunk)
    timer.mark("reference")
    if ro.logprobs is None:  # not the sampler's own (OLD_LOGPROBS)
        ro.logprobs, ro.values = forward_logprobs(run.engine, ro, cfg.gen.temperature, chunk, with_values=True)
    if pending is not None:
        ro.ref_logprobs = reference_logprobs(run, ro, chunk, pending)
    timer.mark("old_logprobs")
    # 4. advantages
    compute_advantages(run, ro)
    # 5. PPO epochs
    m = ppo_epochs(run, ro, ptx_examples)
    timer.mark("update")
    # 6. KL controller, on the global mean KL per sequence
    local = {**rollout_metrics(run, ro), **reference_kl_metrics(run, ro), **component_metrics(ro.components),
             **dialogue_metrics(ro), **m, **self_play.judge_metrics(run)}
    # the reward's counters (faults, retries, a judge's parse failures) summed over ranks; its gauges
    # (learned weights) are the same on every rank
    metrics = {**dist.mean_metrics(local), **dist.sum_counts(run.reward.pop_stats()), **run.reward.gauges(),
               **dist.memory_metrics(run.engine)}
    n_seqs = cfg.ppo.batch * cfg.ppo.num_generations
    if all(math.isfinite(v) for k, v in metrics.items() if k.startswith("ppo/loss/")):
        run.kl_ctl.update(metrics["objective/kl"], n_seqs)
    metrics.update(timer.metrics())
    gen_tokens = metrics["ppo/response_len"] * n_seqs
    metrics["perf/rollout_tokens_per_s"] = gen_tokens / max(metrics["time/rollout_s"], 1e-9)
    metrics["perf/ppo_update_s"] = timer.total
    metrics["perf/ppo_samples_per_s"] = n_seqs / timer.total
    metrics["ppo/lr"] = run.schedules["ppo"].lr
    metrics["objective/kl_coef"] = run.kl_ctl.value
    # 7. every LOG_SAMPLES_EVERY updates, a table of samples for the run's logger (the main rank writes it)
    update, every = run.counters.ppo_update + 1, cfg.log.log_samples_every
    if every and update % every == 0:
        run.log_samples(update, sample_rows(ro, examples, cfg.log.log_samples_rows))
    return metrics


def run_update(ctx: PhaseContext, next_batch: NextBatch) -> dict[str, float]:
    """The PPO phase's step for the loop: the next prompts (and, for PPO-ptx, the next SFT batch)."""
    ptx = next_batch("sft") if ctx.cfg.ppo.ptx_coef > 0 else None
    return ppo_update(ctx, next_batch("ppo"), ptx_examples=ptx)
