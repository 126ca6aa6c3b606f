"""The KV cache manager: which blocks each request's KV lives in. Pure Python, no torch.

    physical blocks   [0][1][2][3][4][5][6][7] ...   (each holds block_size tokens of KV)
    request A table   [3, 0, 6]      tokens 0..47 of A live in blocks 3, 0, 6 in that order
    request B table   [3, 5]         B shares A's first block (same prefix, ref_cnt 2)

Free blocks sit in one doubly linked queue, least recently freed at the head. With prefix
caching, a full block keeps its key after its requests finish; it stays in the free queue
and can be found again until it is taken for new data (evicted), head first: LRU in O(1).

A cached block's key is a chained hash (ipc/block_hash.py); a hit is confirmed by
comparing the block's own token ids, extra keys and the identity of its parent entry, so a
hash collision can never hand one prompt another prompt's KV.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from ipc.block_hash import ROOT_HASH, hash_block_tokens
from worker.request import Request

ROOT_UID = 0  # parent identity of a request's first block


class Block:
    __slots__ = (
        "block_id",
        "extra_keys",
        "hash",
        "next",
        "parent_uid",
        "prev",
        "ref_cnt",
        "token_ids",
        "uid",
    )

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        # Set while the block is in the prefix cache:
        self.hash: int | None = None
        self.uid = 0  # unique per cache entry; children name their parent by it
        self.parent_uid = ROOT_UID
        self.token_ids: tuple[int, ...] = ()
        self.extra_keys: tuple = ()
        # Free-queue links.
        self.prev: Block | None = None
        self.next: Block | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, cached={self.hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the head, push to the tail, unlink in O(1)."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self.head = Block(-1)
        self.tail = Block(-1)
        self.head.next = self.tail
        self.tail.prev = self.head
        self.size = 0
        for b in blocks:
            self.append(b)

    def append(self, block: Block) -> None:
        last = self.tail.prev
        assert last is not None
        last.next = block
        block.prev = last
        block.next = self.tail
        self.tail.prev = block
        self.size += 1

    def popleft(self) -> Block:
        block = self.head.next
        if block is None or block is self.tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev, block.next
        if prev is None or nxt is None:
            raise RuntimeError(f"{block} is not in the free queue")
        prev.next = nxt
        nxt.prev = prev
        block.prev = block.next = None
        self.size -= 1

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # head (next to evict) first
        b = self.head.next
        while b is not None and b is not self.tail:
            yield b
            b = b.next


class BlockTable:
    """One request's blocks, in token order: the only record of what a request holds.

    `ids` mirrors `blocks` as int32 so the model runner copies it into numpy without a
    per-element conversion; `append` keeps the two in step. `keys` holds (hash, uid) of
    each full block keyed in the prefix cache so far (a prefix of `blocks`).
    """

    __slots__ = ("blocks", "ids", "keys", "layer_shift", "offset")

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.ids = array("i")
        self.keys: list[tuple[int, int]] = []
        # KV compression (worker/kv_compression.py): position - cache index of new tokens
        # (> 0: compacted, never keyed in the prefix cache), PyramidKV's per-layer shifts.
        self.offset = 0
        self.layer_shift: tuple[int, ...] | None = None

    def append(self, block: Block) -> None:
        self.blocks.append(block)
        self.ids.append(block.block_id)

    def __len__(self) -> int:
        return len(self.blocks)


_NO_TABLE = BlockTable()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        # hash -> cache entries with that hash (a list, so collisions coexist)
        self.cached: dict[int, list[Block]] = {}
        self.tables: dict[str, BlockTable] = {}  # request id -> its blocks
        self._next_uid = 1
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def block_ids(self, request_id: str) -> list[int]:
        return list(self.block_table(request_id))

    def block_table(self, request_id: str) -> array:
        """The request's block ids (int32, shared: do not modify)."""
        return self.tables.get(request_id, _NO_TABLE).ids

    def kv_layout(self, request_id: str) -> tuple[int, tuple[int, ...] | None]:
        """(position - cache index, PyramidKV layer shifts) of the request's new tokens."""
        table = self.tables.get(request_id, _NO_TABLE)
        return table.offset, table.layer_shift

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache lookup -----------------------------------------------------------
    def _lookup(
        self, parent_hash: int, parent_uid: int, tokens: tuple, extra: tuple
    ) -> Block | None:
        key = hash_block_tokens(parent_hash, tokens, extra)
        for b in self.cached.get(key, ()):
            if b.parent_uid == parent_uid and b.token_ids == tokens and b.extra_keys == extra:
                return b
        return None

    def get_computed_blocks(
        self, request: Request, extra_keys: tuple = ()
    ) -> tuple[list[Block], int]:
        """Longest cached prefix of a new request: (blocks, tokens covered).

        The last token is never taken from the cache: its logits are needed to sample.
        """
        if not self.enable_caching or request.wants_prompt_logprobs:
            return [], 0
        tokens = request.all_token_ids
        # A prefill that ends in a compression computes its window's queries itself.
        tail, comp = 1, request.kv_compression
        if request.kv_compression_pending and comp is not None and comp.will_score(len(tokens)):
            tail = max(1, comp.window)
        max_blocks = max(0, len(tokens) - tail) // self.block_size
        found: list[Block] = []
        parent_hash, parent_uid = ROOT_HASH, ROOT_UID
        for i in range(max_blocks):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            b = self._lookup(parent_hash, parent_uid, chunk, extra_keys)
            if b is None:
                break
            found.append(b)
            assert b.hash is not None
            parent_hash, parent_uid = b.hash, b.uid
        self.prefix_queries += len(tokens)
        self.prefix_hits += len(found) * self.block_size
        return found, len(found) * self.block_size

    # ---- allocation ----------------------------------------------------------------------
    def can_fit(self, num_tokens: int) -> bool:
        """Could a request of this many tokens fit if it had the whole cache to itself?"""
        return self.blocks_needed(num_tokens) <= self.num_blocks

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: Sequence[Block] = (),
        num_lookahead_tokens: int = 0,
        num_tokens_to_cache: int | None = None,
        extra_keys: tuple = (),
    ) -> bool:
        """Give `request` blocks for its computed tokens plus `num_new_tokens` (+ lookahead).

        `computed_blocks` are prefix-cache hits for a request being admitted. Returns False,
        changing nothing, when there are not enough free blocks. Blocks that will be full
        once this step has run (`num_tokens_to_cache`, default: computed + new) are keyed
        in the prefix cache now: the step writes each layer's KV before any attention of
        that layer reads it, so a request scheduled later in the same step may share them.
        """
        rid = request.request_id
        held_table = self.tables.get(rid, _NO_TABLE)
        if not computed_blocks and held_table.blocks:
            args = (num_new_tokens, num_lookahead_tokens, num_tokens_to_cache, extra_keys)
            if self._covered(request, held_table, *args):
                return True
        held = len(held_table)
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_computed -= held_table.offset  # cached tokens: compression dropped `offset`
        total = num_computed + num_new_tokens + num_lookahead_tokens
        need = self.blocks_needed(total) - held - len(computed_blocks)
        # Hits that are free right now leave the free queue, so they cost free blocks too.
        free_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if need + free_hits > self.num_free_blocks:
            return False
        table = self.tables.get(rid)
        if table is None:
            table = self.tables[rid] = BlockTable()
        for b in computed_blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1
            table.append(b)
        for b in computed_blocks[len(table.keys) :]:
            assert b.hash is not None
            table.keys.append((b.hash, b.uid))
        for _ in range(max(need, 0)):
            b = self.free_queue.popleft()
            self._evict(b)
            b.ref_cnt = 1
            table.append(b)
        if self.enable_caching and not table.offset:
            upto = (
                num_computed + num_new_tokens
                if num_tokens_to_cache is None
                else num_tokens_to_cache
            )
            self.cache_full_blocks(request, upto, extra_keys)
        return True

    def _covered(
        self,
        request: Request,
        table: BlockTable,
        num_new_tokens: int,
        num_lookahead_tokens: int,
        num_tokens_to_cache: int | None,
        extra_keys: tuple = (),
    ) -> bool:
        """allocate_slots' common case, a decode step within the blocks held: key the
        blocks it fills (as the full path would) and say True; False: needs new blocks.
        At 1,000 running requests this is most of the scheduler's per-step time."""
        computed = request.num_computed_tokens - table.offset
        if computed + num_new_tokens + num_lookahead_tokens > len(table.blocks) * self.block_size:
            return False
        if self.enable_caching and not table.offset:
            upto = computed + num_new_tokens if num_tokens_to_cache is None else num_tokens_to_cache
            if min(upto, len(request.all_token_ids)) // self.block_size > len(table.keys):
                self.cache_full_blocks(request, upto, extra_keys)
        return True

    def cache_full_blocks(self, request: Request, num_tokens: int, extra_keys: tuple = ()) -> None:
        """Key the request's blocks that are full within its first `num_tokens` tokens."""
        table = self.tables.get(request.request_id)
        if table is None or table.offset:
            return
        held, keys = table.blocks, table.keys
        # Async scheduling: a placeholder's id is unknown yet; its block is keyed later.
        num_tokens = min(num_tokens, len(request.all_token_ids))
        num_full = min(num_tokens // self.block_size, len(held))
        if num_full <= len(keys):
            return
        tokens = request.all_token_ids
        for i in range(len(keys), num_full):
            parent_hash, parent_uid = keys[-1] if keys else (ROOT_HASH, ROOT_UID)
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            existing = self._lookup(parent_hash, parent_uid, chunk, extra_keys)
            if existing is not None:
                # Someone cached this content already; chain through their entry.
                assert existing.hash is not None
                keys.append((existing.hash, existing.uid))
                continue
            b = held[i]
            if b.hash is not None:  # already keyed (shared from the cache)
                keys.append((b.hash, b.uid))
                continue
            b.hash = hash_block_tokens(parent_hash, chunk, extra_keys)
            b.uid = self._next_uid
            self._next_uid += 1
            b.parent_uid = parent_uid
            b.token_ids = chunk
            b.extra_keys = extra_keys
            self.cached.setdefault(b.hash, []).append(b)
            keys.append((b.hash, b.uid))

    def _evict(self, block: Block) -> None:
        if block.hash is None:
            return
        entries = self.cached[block.hash]
        entries.remove(block)
        if not entries:
            del self.cached[block.hash]
        block.hash = None
        block.token_ids = ()
        block.uid = 0

    # ---- compression ---------------------------------------------------------------------
    def compact(
        self,
        request_id: str,
        cached_len: int,
        num_kept: int,
        layer_shift: tuple[int, ...] | None = None,
    ) -> tuple[list[int], list[int]] | None:
        """Give a request a compacted table of blocks for `num_kept` of its `cached_len`
        cached tokens; returns (old block ids, new block ids) for the device copy, or None
        (nothing changed) when there is no room.

        New blocks come from the free queue first, so the old ones keep their prefix-cache
        keys (the uncompressed prompt stays reusable); short of free blocks, the request's
        own unshared blocks are rewritten in place (un-keyed first). The old blocks are
        released here: the copy is queued before any later step can reuse them.
        """
        table = self.tables[request_id]
        if table.offset or num_kept >= cached_len:
            raise ValueError(f"request {request_id!r} cannot be compacted again")
        need = self.blocks_needed(num_kept)
        fresh = min(need, self.num_free_blocks)
        own = [b for b in reversed(table.blocks) if b.ref_cnt == 1][: need - fresh]
        if fresh + len(own) < need:
            return None
        old_ids = list(table.ids)
        new = BlockTable()
        new.offset, new.layer_shift = cached_len - num_kept, layer_shift
        for _ in range(fresh):
            b = self.free_queue.popleft()
            self._evict(b)
            b.ref_cnt = 1
            new.append(b)
        reused = {id(b) for b in own}
        for b in own:
            self._evict(b)  # its content changes: it can no longer answer a lookup
            new.append(b)
        for b in reversed(table.blocks):
            if id(b) in reused:
                continue
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self.free_queue.append(b)
        self.tables[request_id] = new
        return old_ids, list(new.ids)

    # ---- release ---------------------------------------------------------------------------
    def free(self, request_id: str) -> None:
        """Release all of a request's blocks (finish, abort or preemption).

        Freed in reverse so a request's tail blocks are evicted before its head blocks,
        which other requests are more likely to share.
        """
        table = self.tables.pop(request_id, _NO_TABLE)
        for b in reversed(table.blocks):
            if b.ref_cnt <= 0:
                raise RuntimeError(f"{b} freed twice (request {request_id})")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self.free_queue.append(b)

    def check_invariants(self) -> None:
        """For tests: reference counts match the block tables, free queue is consistent."""
        counts = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table.blocks:
                counts[b.block_id] += 1
        free_ids = {b.block_id for b in self.free_queue}
        if len(free_ids) != len(self.free_queue):
            raise AssertionError("a block is in the free queue twice")
        for b in self.blocks:
            if b.ref_cnt != counts[b.block_id]:
                raise AssertionError(f"{b}: ref_cnt {b.ref_cnt}, held {counts[b.block_id]} times")
            if (b.ref_cnt == 0) != (b.block_id in free_ids):
                raise AssertionError(f"{b}: free-queue membership disagrees with ref_cnt")
