"""cs/store.py on a real SQLite file: lifecycle (confirm deletes, TTL expiry), usage for quotas,
and interrupted uploads removed at start."""

from cs.store import Store


def stored(store: Store, item: bytes, recipients: list[bytes], size: int, expires_ms: int) -> None:
    store.partial(item).write_bytes(b"c" * size)
    store.persist(item)
    store.index(item, b"S" * 20, {"item": item.hex()}, recipients, size, 1, expires_ms)


def test_confirm_deletes_once_every_recipient_has_it(tmp_path):
    store = Store(tmp_path)
    a, b = b"A" * 20, b"B" * 20
    stored(store, b"\x01" * 16, [a, b], 10, 10**15)
    assert store.recipient_usage(a) == 10 and store.sender_usage(b"S" * 20) == (1, 10)
    assert not store.confirm(b"\x01" * 16, a)
    assert not store.waiting_for(a, b"\x01" * 16) and store.waiting_for(b, b"\x01" * 16)
    assert store.recipient_usage(a) == 0 and store.blob(b"\x01" * 16).exists()
    assert store.confirm(b"\x01" * 16, b)
    assert store.get(b"\x01" * 16) is None and not store.blob(b"\x01" * 16).exists()
    assert store.count() == (0, 0)


def test_expiry_and_interrupted_uploads(tmp_path):
    store = Store(tmp_path)
    stored(store, b"\x01" * 16, [b"A" * 20], 5, 1000)
    stored(store, b"\x02" * 16, [b"A" * 20], 7, 10**15)
    assert [i.item for i in store.inbox(b"A" * 20, 2000)] == [b"\x02" * 16]  # expired ones are not offered
    assert store.expire(2000) == 1
    assert not store.blob(b"\x01" * 16).exists() and store.count() == (1, 7)
    store.partial(b"\x03" * 16).write_bytes(b"half an upload")
    store.close()
    again = Store(tmp_path)  # a restart after a crash mid-upload: the part was never acknowledged
    assert not again.partial(b"\x03" * 16).exists() and again.count() == (1, 7)
