"""The reference phase protocol: policy ranks send token ids, reference ranks answer with log-probs.

Who talks to whom
    Reference rank r serves the policy ranks p with ``p % R == r`` (engine/placement.py). Each reference
    and its clients share one bridge group (gloo, point-to-point, CPU tensors); the default
    process group, which on policy ranks is DeepSpeed's, is never used here.

What is sent (H = an int64[8] header; headers on tag 1, payloads on tag 2)
    policy -> reference
      REQUEST   H = [REQUEST, B, L, P, T, temperature as float64 bits, seq, k]   k: the model asked (REFS)
                then int64 (2, B, L): input_ids and attention_mask stacked, L = P + T
      SHUTDOWN  H = [SHUTDOWN, 0, 0, 0, 0, 0, seq, 0]          this client is done, nothing follows
      ABORT     H = [ABORT, 0, 0, 0, 0, 0, seq, 0]             this client failed, the reference stops
      SYNC      H = [SYNC, n, sends, alpha as float64 bits, 0, 0, seq, 0]   REF_SYNC_EVERY: every client of
                the reference in one round; the first (sends 1) follows with the manifest and the n
                weights (reference/weights.py), the others (sends 0) with nothing
    reference -> policy
      RESULT    H = [RESULT, B, T, 0, 0, 0, seq, 0]   then float32 (B, T) log-probs of the response
      ERROR     H = [ERROR, nbytes, 0, 0, 0, 0, seq, 0] then uint8 (nbytes,) UTF-8 message
      SYNCED    H = [SYNCED, n, 0, 0, 0, 0, seq, 0]   to every client of a SYNC round, once the weights are in

In which order
    Each client's messages are FIFO, and each REQUEST is answered by exactly one RESULT or ERROR,
    in order (a client may send its next requests before waiting the previous reply: the non-blocking
    :meth:`RefClient.request` lets it score rewards meanwhile). The server works in rounds: it receives
    one message from every active client, in client order, runs the round's requests for one model as one
    batch (prompts left-padded, responses right-padded to the longest, mask 0: every log-prob unchanged
    up to float rounding), and replies to each client. Policy ranks run in lock step: a PPO update's
    requests share a round, one round per model (REFS, config/refs.py: every reference rank holds them all).

How shutdown works
    A client sends SHUTDOWN when it is done (:meth:`RefClient.close`, or leaving its ``with``
    block); :meth:`RefServer.serve` returns once every client has, and the reference exits 0.

Faults: every wait is bounded and every error names the rank
    - compute_fn raises on the reference: it sends ERROR (the exception text) to each of its
      clients, then re-raises, so the reference exits non-zero and each client raises
      ``BridgeError("reference rank N failed: ...")``.
    - the reference dies: gloo sees its TCP connections close; a client raises at once ("closed
      its connection"), at the latest on its next call.
    - the reference hangs: a client raises after the bridge timeout (REF_TIMEOUT_S); a watchdog
      ends a reference whose compute_fn runs longer than that.
    - a client raises: leaving its ``with`` block sends ABORT; a client dies: its connection
      closes. Either way the server sends ERROR to its other clients and raises.
    The bridge timeout also bounds how long a policy rank waits for the slowest policy rank that
    shares its reference, so it must exceed the spread of rollout times between ranks.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from hybrid_ds.models.logprobs import lm_response_logprobs, sequence_inputs
from hybrid_ds.engine.placement import TAG_HEADER, TAG_PAYLOAD, Bridge, BridgeError
from hybrid_ds.reference.weights import manifest_tensor, receive_weights, send_sync

REQUEST, SHUTDOWN, ABORT, RESULT, ERROR, SYNC, SYNCED = 1, 2, 3, 4, 5, 6, 7
_OP_NAMES = dict(enumerate(("REQUEST", "SHUTDOWN", "ABORT", "RESULT", "ERROR", "SYNC", "SYNCED"), start=1))
HEADER_LEN = 8
ABORT_WAIT_S = 5.0  # how long a failing side waits to deliver its last words
IDLE_TIMEOUT_S = 7 * 24 * 3600.0  # a server waits this long for its next request (SFT phases run between)

# (input_ids (B, L) long, attention_mask (B, L) long, P, T, temperature) -> (B, T) float32
ComputeFn = Callable[[torch.Tensor, torch.Tensor, int, int, float], torch.Tensor]


def _header(op: int, *fields: int, seq: int = 0) -> torch.Tensor:
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0] = op
    for i, v in enumerate(fields):
        h[1 + i] = int(v)
    h[6] = seq
    return h


def _float_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64).item())


def _bits_float(b: int) -> float:
    return float(torch.tensor([b], dtype=torch.int64).view(torch.float64).item())


# --------------------------------------------------------------------------------------
# policy side


class PendingLogprobs:
    """A request in flight; :meth:`wait` returns its ``(B, T)`` float32 log-probs."""

    def __init__(self, client: "RefClient", seq: int, B: int, T: int, device: torch.device, sends: list,
                 keep: tuple, reply_header: torch.Tensor, reply_work):
        self.client, self.seq, self.B, self.T, self.device = client, seq, B, T, device
        self._sends, self._keep = sends, keep  # the sent tensors stay alive until the sends are done
        self._reply_header, self._reply_work = reply_header, reply_work
        self._result: Optional[torch.Tensor] = None

    def wait(self) -> torch.Tensor:
        """Block until the reply is in (earlier requests of this client are completed first)."""
        if self._result is None:
            self.client._complete_through(self)
        return self._result


class RefClient:
    """Policy side: ask this rank's reference for log-probs. Use as a context manager, so that
    leaving the block sends SHUTDOWN (or ABORT when an exception leaves it)."""

    def __init__(self, bridge: Bridge):
        if bridge.placement.role != "policy":
            raise ValueError(f"RefClient runs on policy ranks; this is {bridge.describe(bridge.placement.rank)}")
        self.bridge, self.ref = bridge, bridge.reference
        self._seq = 0
        self._pending: collections.deque[PendingLogprobs] = collections.deque()
        self._failed: Optional[BridgeError] = None
        self._closed = False

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                 response_len: int, temperature: float) -> torch.Tensor:
        """Reference log-probs ``(B, T)`` float32 of the response tokens ``input_ids[:, P:]``.

        ``input_ids``/``attention_mask``: ``(B, P+T)`` prompt (left-padded) + response, as built
        by ``models.logprobs.sequence_inputs``; ``response_start`` = P, ``response_len`` = T. Blocking.
        """
        return self.request(input_ids, attention_mask, response_start, response_len, temperature).wait()

    def request(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                response_len: int, temperature: float, ref: int = 0) -> PendingLogprobs:
        """Send the request for model ``ref`` (REFS) and return at once; ``.wait()`` gives the log-probs."""
        self._check_open()
        B, L = input_ids.shape
        P, T = int(response_start), int(response_len)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if B < 1 or P < 1 or T < 1 or P + T != L:
            raise ValueError(f"need B >= 1, response_start P >= 1, response_len T >= 1 and P + T == L; "
                             f"got B={B}, P={P}, T={T}, L={L}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self._seq += 1
        payload = torch.stack([input_ids.detach().to("cpu", torch.int64),
                               attention_mask.detach().to("cpu", torch.int64)]).contiguous()
        header = _header(REQUEST, B, L, P, T, _float_bits(float(temperature)), self._seq, int(ref), seq=self._seq)
        br = self.bridge
        sends = [br.isend(header, self.ref, TAG_HEADER), br.isend(payload, self.ref, TAG_PAYLOAD)]
        reply_header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        reply_work = br.irecv(reply_header, self.ref, TAG_HEADER)
        pending = PendingLogprobs(self, self._seq, B, T, input_ids.device, sends, (header, payload),
                                  reply_header, reply_work)
        self._pending.append(pending)
        return pending

    def sync(self, manifest: Sequence[tuple[int, torch.dtype]], weights: Iterable[torch.Tensor], alpha: float) -> None:
        """``ref = alpha * policy + (1 - alpha) * ref`` (REF_SYNC_ALPHA) from ``engine/param_stream.py``'s weights, by
        every client at once (lock step); returns once the reference has them; faults raise as requests do."""
        self._check_open()
        if self._pending:
            self._complete_through(self._pending[-1])
        br, ref, sender = self.bridge, self.ref, self.bridge.placement.rank == self.bridge.clients[0]
        table = manifest_tensor(manifest)  # before anything is sent: every rank raises alike
        self._seq += 1
        try:
            header = _header(SYNC, len(manifest), int(sender), _float_bits(float(alpha)), seq=self._seq)
            reply = send_sync(br, ref, header, table if sender else None, weights)
            op, n, seq = (int(x) for x in reply[[0, 1, 6]])
            if op == ERROR:
                raise BridgeError(f"{br.describe(ref)} failed: {self._error_text(n)}", ref)
            if op != SYNCED or seq != self._seq or n != len(manifest):
                raise BridgeError(f"protocol error: expected SYNCED seq {self._seq} from {br.describe(ref)}, got "
                                  f"{_OP_NAMES.get(op, op)} seq {seq}", ref)
        except BridgeError as e:
            self._failed = e
            raise

    def _complete_through(self, target: PendingLogprobs) -> None:
        while True:
            self._check_failed()
            if not self._pending:
                raise RuntimeError("this request was already completed or belongs to another client")
            p = self._pending.popleft()
            try:
                p._result = self._receive_reply(p)
            except BridgeError as e:
                self._failed = e
                raise
            if p is target:
                return

    def _receive_reply(self, p: PendingLogprobs) -> torch.Tensor:
        br, ref = self.bridge, self.ref
        for w in p._sends:
            br.wait(w, ref, "sending a log-prob request")
        br.wait(p._reply_work, ref, "waiting for reference log-probs")
        op, a, b, seq = (int(x) for x in p._reply_header[[0, 1, 2, 6]])
        if op == ERROR:
            raise BridgeError(f"{br.describe(ref)} failed: {self._error_text(a)}", ref)
        if op != RESULT or seq != p.seq or (a, b) != (p.B, p.T):
            raise BridgeError(f"protocol error: expected RESULT seq {p.seq} of shape ({p.B}, {p.T}) from "
                              f"{br.describe(ref)}, got {_OP_NAMES.get(op, op)} seq {seq} ({a}, {b})", ref)
        out = torch.empty(p.B, p.T, dtype=torch.float32)
        br.wait(br.irecv(out, ref, TAG_PAYLOAD), ref, "receiving reference log-probs")
        return out.to(p.device)

    def _error_text(self, nbytes: int) -> str:
        buf = torch.empty(max(nbytes, 0), dtype=torch.uint8)
        self.bridge.wait(self.bridge.irecv(buf, self.ref, TAG_PAYLOAD), self.ref, "receiving its error message")
        return bytes(buf.tolist()).decode("utf-8", "replace")

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise BridgeError(f"(earlier failure) {self._failed}", self._failed.peer)

    def _check_open(self) -> None:
        self._check_failed()
        if self._closed:
            raise RuntimeError("RefClient is closed")

    def close(self) -> None:
        """Complete outstanding requests, then send SHUTDOWN (once)."""
        if self._closed or self._failed is not None:
            return
        if self._pending:
            self._complete_through(self._pending[-1])
        self._closed = True
        self.bridge.wait(self.bridge.isend(_header(SHUTDOWN, seq=self._seq + 1), self.ref, TAG_HEADER), self.ref,
                         "sending SHUTDOWN")

    def abort(self) -> None:
        """Tell the reference this rank failed (best effort, a few seconds at most); never raises."""
        if self._closed or self._failed is not None:
            return
        self._closed = True
        try:
            w = self.bridge.isend(_header(ABORT, seq=self._seq + 1), self.ref, TAG_HEADER)
            self.bridge.wait(w, self.ref, "sending ABORT", ABORT_WAIT_S)
        except Exception:  # the reference may be gone already; the original error matters
            pass

    def __enter__(self) -> "RefClient":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------
# reference side


@dataclass
class Request:
    """One client's request as the server holds it."""

    client: int  # world rank
    seq: int
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    P: int  # prompt length (response starts here)
    T: int  # response length
    temperature: float
    ref: int = 0  # which of the server's models answers (REFS order)


def merge_requests(reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One batch ``(sum B, P* + T*)`` from requests of different shapes: each prompt left-padded to
    the longest prompt P*, each response right-padded to the longest response T*, padding with
    id 0 and mask 0. Positions come from the mask, so this leaves every request's log-probs as they
    were (up to float rounding). Rows keep the order of ``reqs``."""
    P = max(r.P for r in reqs)
    T = max(r.T for r in reqs)
    B = sum(r.input_ids.shape[0] for r in reqs)
    ids = torch.zeros(B, P + T, dtype=torch.int64)
    mask = torch.zeros(B, P + T, dtype=torch.int64)
    row = 0
    for r in reqs:
        b = r.input_ids.shape[0]
        for dst, src in ((ids, r.input_ids), (mask, r.attention_mask)):
            dst[row:row + b, P - r.P:P] = src[:, :r.P]
            dst[row:row + b, P:P + r.T] = src[:, r.P:]
        row += b
    return ids, mask, P, T


@dataclass
class ServeStats:
    """What a server did, for its log line."""

    rounds: int = 0
    requests: int = 0
    rows: int = 0
    syncs: int = 0  # SYNC rounds: the policy's weights taken (REF_SYNC_EVERY)
    compute_s: float = 0.0
    idle_s: float = 0.0
    per_client: dict = field(default_factory=dict)


class _ClientAborted(Exception):
    pass


class RefServer:
    """Reference side: answer every client's requests with ``compute_fn`` until all shut down.

    ``compute_fn(input_ids, attention_mask, P, T, temperature) -> (B, T)`` float32 (:func:`model_logprob_fn`),
    or a list, the k-th answering model k (REFS). ``batch_clients``: a round's requests as one batch (False:
    one call per request, each bit-identical to a local computation). ``weights``: the parameters a SYNC
    round updates (the model's, REFS' "policy" one, in ``named_parameters`` order; None: SYNC is refused).
    """

    def __init__(self, bridge: Bridge, compute_fn: ComputeFn, *, batch_clients: bool = True,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, watchdog: bool = True,
                 weights: Optional[Sequence[torch.Tensor]] = None):
        if bridge.placement.role != "reference":
            raise ValueError(f"RefServer runs on reference ranks; this is {bridge.describe(bridge.placement.rank)}")
        self.bridge, self.compute_fn, self.weights = bridge, compute_fn, weights
        self.batch_clients, self.idle_timeout_s, self.watchdog = batch_clients, idle_timeout_s, watchdog
        self.me = bridge.describe(bridge.placement.rank)
        self.stats = ServeStats()
        self._active: list[int] = []

    def serve(self) -> ServeStats:
        """Serve rounds until every client has sent SHUTDOWN. Raises (after telling the clients) on
        a failed compute_fn, a failed/aborted client, or a protocol error."""
        self._active = list(self.bridge.clients)
        expected = {c: 1 for c in self._active}
        while self._active:
            try:
                reqs = self._receive_round(expected)
                self._reply(reqs, self._compute(reqs))
            except BridgeError as e:
                self._tell_clients(f"{e}; {self.me} stopped", skip=e.peer)
                raise
            except _ClientAborted as e:
                message, peer = e.args
                self._tell_clients(f"{message}; {self.me} stopped", skip=peer)
                raise BridgeError(message, peer) from None
            except Exception as e:
                self._tell_clients(f"{type(e).__name__}: {e}")
                raise
        return self.stats

    # -- one round --------------------------------------------------------------------------
    def _receive_round(self, expected: dict[int, int]) -> list[Request]:
        br = self.bridge
        headers = {c: torch.zeros(HEADER_LEN, dtype=torch.int64) for c in self._active}
        works = {c: br.irecv(headers[c], c, TAG_HEADER) for c in self._active}
        reqs, syncs, t0 = [], [], time.perf_counter()
        for c in list(self._active):
            br.wait(works[c], c, "waiting for its next request", self.idle_timeout_s)
            h = [int(x) for x in headers[c]]
            op, seq = h[0], h[6]
            if op == ABORT:
                raise _ClientAborted(f"{br.describe(c)} aborted (see its log for the error)", c)
            if seq != expected[c] or op not in (REQUEST, SHUTDOWN, SYNC):
                raise BridgeError(f"protocol error: {br.describe(c)} sent {_OP_NAMES.get(op, op)} seq {seq}, "
                                  f"expected REQUEST, SYNC or SHUTDOWN seq {expected[c]}", c)
            expected[c] += 1
            if op == SYNC:
                syncs.append((c, seq, h[1], h[2], _bits_float(h[3])))
                continue
            if op == SHUTDOWN:
                self._active.remove(c)
                continue
            B, L, P, T = h[1:5]
            payload = torch.empty(2, B, L, dtype=torch.int64)
            br.wait(br.irecv(payload, c, TAG_PAYLOAD), c, "receiving its request")
            reqs.append(Request(c, seq, payload[0], payload[1], P, T, _bits_float(h[5]), h[7]))
        self.stats.idle_s += time.perf_counter() - t0
        if syncs:
            self._sync(syncs, mixed=len(syncs) != len(headers))
        return reqs

    def _sync(self, syncs: list[tuple], mixed: bool) -> None:
        """A SYNC round: take the weights from the one client that sends them, then answer SYNCED to all."""
        br = self.bridge
        senders = [c for c, _, _, sends, _ in syncs if sends]
        if mixed or len(senders) != 1 or len({(n, a) for _, _, n, _, a in syncs}) != 1:
            raise BridgeError(f"protocol error: a SYNC round needs SYNC (one size and alpha) from each of the "
                              f"{len(self._active)} active clients, weights from one; got {syncs}", syncs[0][0])
        if self.weights is None:
            raise ValueError("this reference takes no weights (it was started without them)")
        n, alpha = syncs[0][2], syncs[0][4]
        receive_weights(br, senders[0], self.weights, n, alpha)
        for c, seq, *_ in syncs:
            done = _header(SYNCED, n, seq=seq)
            br.wait(br.isend(done, c, TAG_HEADER), c, "taking SYNCED")
        self.stats.syncs += 1

    def _compute(self, reqs: list[Request]) -> dict[int, torch.Tensor]:
        """Log-probs per request (keyed by client), requests of equal temperature and model batched together."""
        out: dict[int, torch.Tensor] = {}
        by_temp: dict[tuple, list[Request]] = {}
        for r in reqs:
            by_temp.setdefault((r.temperature, r.ref), []).append(r)
        for (temp, ref), group in by_temp.items():
            for batch in ([group] if self.batch_clients else [[r] for r in group]):
                ids, mask, P, T = merge_requests(batch)
                lp = self._run(ids, mask, P, T, temp, ref)
                row = 0
                for r in batch:
                    b = r.input_ids.shape[0]
                    out[r.client] = lp[row:row + b, :r.T].contiguous()
                    row += b
        self.stats.rounds += bool(reqs)
        return out

    def _run(self, ids, mask, P, T, temperature, ref=0) -> torch.Tensor:
        if not 0 <= ref < len(fns := self.compute_fn if isinstance(self.compute_fn, list) else [self.compute_fn]):
            raise ValueError(f"a request for model {ref}; this reference holds {len(fns)} (REFS)")
        timer = None
        if self.watchdog:
            timer = threading.Timer(self.bridge.timeout_s, self._watchdog_fired)
            timer.daemon = True
            timer.start()
        t0 = time.perf_counter()
        try:
            lp = fns[ref](ids, mask, P, T, temperature)
        finally:
            if timer is not None:
                timer.cancel()
        self.stats.compute_s += time.perf_counter() - t0
        if not isinstance(lp, torch.Tensor) or tuple(lp.shape) != (ids.shape[0], T):
            got = tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
            raise ValueError(f"compute_fn returned {got}, expected a ({ids.shape[0]}, {T}) tensor")
        return lp.detach().to("cpu", torch.float32)

    def _reply(self, reqs: list[Request], replies: dict[int, torch.Tensor]) -> None:
        br, sends = self.bridge, []
        for r in reqs:
            lp = replies[r.client]
            header = _header(RESULT, lp.shape[0], lp.shape[1], seq=r.seq)
            sends.append((r.client, header, lp, br.isend(header, r.client, TAG_HEADER),
                          br.isend(lp, r.client, TAG_PAYLOAD)))
            self.stats.requests += 1
            self.stats.rows += lp.shape[0]
            self.stats.per_client[r.client] = self.stats.per_client.get(r.client, 0) + 1
        for c, _, _, w1, w2 in sends:  # a client takes its reply when it calls wait(): its pace
            br.wait(w1, c, "taking its reply", self.idle_timeout_s)
            br.wait(w2, c, "taking its reply", self.idle_timeout_s)

    # -- faults -----------------------------------------------------------------------------
    def _tell_clients(self, message: str, skip: Optional[int] = None) -> None:
        """Best effort: send ERROR(message) to every active client but ``skip``; never raises."""
        data = torch.tensor(list((message or "unknown error").encode("utf-8")[:8192]), dtype=torch.uint8)
        header = _header(ERROR, data.numel())
        sends = []
        for c in self._active:
            if c == skip:
                continue
            try:
                sends.append((c, self.bridge.isend(header, c, TAG_HEADER), self.bridge.isend(data, c, TAG_PAYLOAD)))
            except Exception:
                pass
        deadline = time.monotonic() + ABORT_WAIT_S
        for c, w1, w2 in sends:
            for w in (w1, w2):
                try:
                    self.bridge.wait(w, c, "taking an error", max(0.1, deadline - time.monotonic()))
                except Exception:
                    break

    def _watchdog_fired(self) -> None:
        msg = (f"{self.me}: compute_fn ran longer than the bridge timeout ({self.bridge.timeout_s:g} s, "
               f"REF_TIMEOUT_S); the reference process exits so that no rank waits forever")
        print(f"[hybrid_ds] {msg}", file=sys.stderr, flush=True)
        self._tell_clients(msg)
        os._exit(1)


def model_logprob_fn(model: torch.nn.Module, *, chunk: int = 0,
                     device: Optional[torch.device] = None) -> ComputeFn:
    """A compute_fn running a causal LM exactly as the colocated reference does (``algorithms.ppo.forward_logprobs``):
    positions from the mask, logits divided by the temperature, ``chunk`` rows per forward (0 = all)."""

    dev = device if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def compute(input_ids, attention_mask, P, T, temperature):
        ids, att, pos = sequence_inputs(input_ids[:, :P].to(dev), attention_mask[:, :P].to(dev),
                                        input_ids[:, P:].to(dev), attention_mask[:, P:].to(dev))
        B = ids.shape[0]
        step = chunk if chunk > 0 else max(B, 1)
        out = []
        for s in range(0, B, step):
            sl = slice(s, s + step)
            out.append(lm_response_logprobs(model, ids[sl], att[sl], pos[sl], ids[sl, P:], temperature))
        return torch.cat(out).float() if out else torch.zeros(0, T)

    return compute
