"""docs/PROTOCOL.md §2: the Node Transaction test vector, byte for byte."""

from eth_account import Account
from eth_account.messages import encode_typed_data

from ntm import keys, record

KEY = keys.private_key(bytes.fromhex("01" * 32))
DOMAIN = record.Domain(31337, bytes.fromhex("5FbDB2315678afecb367f032d93F642f64180aa3"))
DC = bytes.fromhex("70997970C51812dc3A010C7d01b50e0d17dc79C8")
REC = record.NodeTransaction(keys.node_id_of(KEY), DC, 1700000000000, False)


def test_identity_vector():
    assert keys.public_bytes(KEY).hex() == (
        "041b84c5567b126440995d3ed5aaba0565d71e1834604819ff9c17f5e9d5dd078f"
        "70beaf8f588b541507fed6a642c5ab42dfdf8120a7f639de5122d47a69a8e8d1"
    )
    assert keys.checksum(REC.node) == "0x1a642f0E3c3aF545E7AcBD38b07251B3990914F1"


def test_node_transaction_vector():
    assert record.RECORD_TYPEHASH.hex() == "c6ec4b3aa28c3b7599eab461c23c62b0eab6df493f45a1e1de599670722bc6f8"
    assert DOMAIN.separator().hex() == "3046238a0fca92d8957efc7dc56153bf1791e73b87538a3976e1569a83255ec9"
    assert REC.struct_hash().hex() == "3e2bdb53be8d0cb6c96720ddd616a8009c2fe619f0bf2ed2ad90796b68af6fb3"
    assert REC.digest(DOMAIN).hex() == "6199b9ab6ae0b8e1f24120bfced84999ad9fa45ba66112824bf574fffb035651"
    sig = REC.sign(KEY, DOMAIN)
    assert sig.hex() == (
        "cc5d90d7577d14ef8c701f27894a4be6145c190c4588395a1f99885445ea60a0"
        "33f303b2e9b56f7fb4f1e8fa15a79236f4ba2dff913b5604e2d4ba9d45988b2c1c"
    )
    r, vs = record.to_compact(sig)
    assert vs.hex() == "b3f303b2e9b56f7fb4f1e8fa15a79236f4ba2dff913b5604e2d4ba9d45988b2c"


def test_digest_matches_eth_account_eip712():
    """An independent EIP-712 implementation computes the same digest and signature."""
    msg = encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "NodeTransaction": [
                    {"name": "node", "type": "address"},
                    {"name": "dc", "type": "address"},
                    {"name": "timestamp", "type": "uint64"},
                    {"name": "revoked", "type": "bool"},
                ],
            },
            "primaryType": "NodeTransaction",
            "domain": {
                "name": record.DOMAIN_NAME,
                "version": record.DOMAIN_VERSION,
                "chainId": 31337,
                "verifyingContract": keys.checksum(DOMAIN.registry),
            },
            "message": {
                "node": keys.checksum(REC.node),
                "dc": keys.checksum(DC),
                "timestamp": REC.timestamp,
                "revoked": REC.revoked,
            },
        }
    )
    signed = Account.sign_message(msg, KEY.secret)
    assert bytes(signed.message_hash) == REC.digest(DOMAIN)
    assert bytes(signed.signature) == REC.sign(KEY, DOMAIN)
