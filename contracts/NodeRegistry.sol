// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// @title NTMobile NodeRegistry
/// @notice Shared registry of the DC federation: for every node ID (the Ethereum address of the
/// node's secp256k1 key) the newest node-signed record "my home DC is `dc` as of `timestamp`,
/// revoked or not". Spec: docs/PROTOCOL.md §2 (Node Transaction) and §3 (this contract).
///
/// The DC named in a record is never passed in: it is msg.sender, and it is part of the EIP-712
/// digest the node signed. A record signed for DC X and submitted by DC Y therefore recovers to a
/// different address and is refused as "bad signature": a DC can neither forge nor re-home a node.
contract NodeRegistry {
    /// A node-signed record as submitted by its home DC (the caller). Signature in EIP-2098
    /// compact form: vs = yParity << 255 | s.
    struct SignedRecord {
        address node;
        uint64 timestamp;
        bool revoked;
        bytes32 r;
        bytes32 vs;
    }

    struct DC {
        bool active; // alone in the struct's first slot: register() reads it with one SLOAD
        string hostname;
        string endpoint;
    }

    // Reason codes of RecordRejected (0 = accepted). Same order as the revert strings below.
    uint8 internal constant OK = 0;
    uint8 internal constant BAD_SIGNATURE = 1;
    uint8 internal constant HIGH_S = 2;
    uint8 internal constant STALE_TIMESTAMP = 3;
    uint8 internal constant FUTURE_TIMESTAMP = 4;
    uint8 internal constant NODE_REVOKED = 5;
    uint8 internal constant MALFORMED = 6; // a field out of its ABI range (dirty address/uint64/bool)

    /// How far (ms) a record's timestamp may be ahead of chain time (PROTOCOL.md §2 rule 4).
    uint256 public constant MAX_FUTURE_MS = 600_000;

    bytes32 internal constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    // Literal constants so inline assembly can use them; the constructor checks each one.
    bytes32 internal constant RECORD_TYPEHASH = 0xc6ec4b3aa28c3b7599eab461c23c62b0eab6df493f45a1e1de599670722bc6f8;
    bytes32 internal constant REGISTERED_TOPIC = 0xc65318a717c5d5cc9d68e41cb59cefc6990e04dc3a4fb45769fe8f49041970f2;
    bytes32 internal constant REVOKED_TOPIC = 0x8377cd0f5fa7e435aca755d57d0a16d03a640f0db5d5a101ae213c7f6a0da700;
    bytes32 internal constant REJECTED_TOPIC = 0x6ef0a6a001ed314d6e74d6317e8140e73907d3859a7f9bbc8f4ec25135dca4e5;
    bytes32 internal constant NAME_HASH = keccak256("NTMobile NodeRegistry");
    bytes32 internal constant VERSION_HASH = keccak256("1");
    uint256 internal constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    uint256 internal constant S_MASK = (1 << 255) - 1;

    bytes32 private immutable _cachedDomainSeparator;
    uint256 private immutable _cachedChainId;

    /// node => dc (bits 0..159) | timestamp (bits 160..223) | revoked (bit 224). One slot per node.
    mapping(address => uint256) private _records;
    mapping(address => DC) private _dcs;
    address[] private _dcList;
    mapping(address => uint256) private _dcIndex; // position in _dcList + 1 (0 = absent)
    address public owner;

    event NodeRegistered(address indexed node, address indexed dc, uint64 timestamp);
    event NodeRevoked(address indexed node, address indexed dc, uint64 timestamp);
    /// Emitted by registerBatch for each skipped record; reason is one of the codes above.
    event RecordRejected(address indexed node, uint8 reason);
    event DCAdmitted(address indexed dc, string hostname, string endpoint);
    event DCUpdated(address indexed dc, string hostname, string endpoint);
    event DCRemoved(address indexed dc);
    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);

    constructor() {
        assert(RECORD_TYPEHASH == keccak256("NodeTransaction(address node,address dc,uint64 timestamp,bool revoked)"));
        assert(REGISTERED_TOPIC == NodeRegistered.selector);
        assert(REVOKED_TOPIC == NodeRevoked.selector);
        assert(REJECTED_TOPIC == RecordRejected.selector);
        owner = msg.sender;
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator();
        emit OwnershipTransferred(address(0), msg.sender);
    }

    // ------------------------------------------------------------------ EIP-712

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }

    /// The EIP-712 domain separator; recomputed if the chain id changed since deployment (fork).
    function domainSeparator() public view returns (bytes32) {
        if (block.chainid == _cachedChainId) return _cachedDomainSeparator;
        return _buildDomainSeparator();
    }

    function _digest(address node, address dc, uint64 ts, bool revoked) private view returns (bytes32 d) {
        bytes32 sep = domainSeparator();
        bytes32 typehash = RECORD_TYPEHASH;
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, RECORD_TYPEHASH)
            mstore(add(p, 0x20), node)
            mstore(add(p, 0x40), dc)
            mstore(add(p, 0x60), ts)
            mstore(add(p, 0x80), revoked)
            let structHash := keccak256(p, 0xa0)
            mstore(p, 0x1901000000000000000000000000000000000000000000000000000000000000)
            mstore(add(p, 0x02), sep)
            mstore(add(p, 0x22), structHash)
            d := keccak256(p, 0x42)
        }
    }

    /// The digest a node signs for this record (same as ntm.record.NodeTransaction.digest).
    function digest(address node, address dc, uint64 timestamp, bool revoked) external view returns (bytes32) {
        return _digest(node, dc, timestamp, revoked);
    }

    // ------------------------------------------------------------------ records
    //
    // The hot path is written in assembly: in Solidity, ABI-decoding and validating each calldata
    // struct field, the ecrecover builtin and event encoding cost ~2,300 gas per record of pure
    // overhead (measured: 776 opcodes per record), about 8% of a batch.

    /// Checks the record at calldata offset `rec` (a SignedRecord) submitted by `dc` and, if it
    /// passes, stores it and emits NodeRegistered / NodeRevoked. Returns a reason code (OK = 0:
    /// stored; else nothing changed). The one check shared by register() and registerBatch().
    function _apply(uint256 rec, address dc, bytes32 sep) private returns (uint256 reason) {
        assembly ("memory-safe") {
            let node := calldataload(rec)
            let ts := calldataload(add(rec, 0x20))
            let revoked := calldataload(add(rec, 0x40))
            mstore(0x00, node)
            mstore(0x20, _records.slot)
            let slot := keccak256(0x00, 0x40)
            let stored := sload(slot)
            // Order: malformed, revoked, stale, future, high s, signature (cheap checks first).
            for {} 1 {} {
                if or(or(shr(160, node), shr(64, ts)), gt(revoked, 1)) {
                    reason := 6 // MALFORMED: not a valid ABI encoding of the struct
                    break
                }
                if shr(224, stored) {
                    reason := 5 // NODE_REVOKED
                    break
                }
                if iszero(gt(ts, and(shr(160, stored), 0xffffffffffffffff))) {
                    reason := 3 // STALE_TIMESTAMP
                    break
                }
                if gt(ts, add(mul(timestamp(), 1000), 600000)) {
                    reason := 4 // FUTURE_TIMESTAMP
                    break
                }
                let vs := calldataload(add(rec, 0x80))
                let s := and(vs, 0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff)
                if gt(s, 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0) {
                    reason := 2 // HIGH_S
                    break
                }
                let p := mload(0x40)
                mstore(p, RECORD_TYPEHASH)
                mstore(add(p, 0x20), node)
                mstore(add(p, 0x40), dc)
                mstore(add(p, 0x60), ts)
                mstore(add(p, 0x80), revoked)
                let structHash := keccak256(p, 0xa0)
                mstore(p, 0x1901000000000000000000000000000000000000000000000000000000000000)
                mstore(add(p, 0x02), sep)
                mstore(add(p, 0x22), structHash)
                let d := keccak256(p, 0x42)
                mstore(p, d)
                mstore(add(p, 0x20), add(shr(255, vs), 27))
                calldatacopy(add(p, 0x40), add(rec, 0x60), 0x20) // r
                mstore(add(p, 0x60), s)
                // 0x00 still holds `node` from the slot hash: clear it, since ecrecover returns
                // nothing (0x00 stays zero) for a signature it cannot recover.
                mstore(0x00, 0)
                pop(staticcall(gas(), 0x01, p, 0x80, 0x00, 0x20))
                let signer := mload(0x00)
                if or(iszero(signer), iszero(eq(signer, node))) {
                    reason := 1 // BAD_SIGNATURE
                    break
                }
                sstore(slot, or(dc, or(shl(160, ts), shl(224, revoked))))
                mstore(0x00, ts)
                let topic := REGISTERED_TOPIC
                if revoked { topic := REVOKED_TOPIC }
                log3(0x00, 0x20, topic, node, dc)
                break
            }
        }
    }

    function _requireActiveDC() private view {
        require(_dcs[msg.sender].active, "NodeRegistry: not an active DC");
    }

    function _revertReason(uint256 reason) private pure {
        if (reason == BAD_SIGNATURE) revert("NodeRegistry: bad signature");
        if (reason == HIGH_S) revert("NodeRegistry: high s");
        if (reason == STALE_TIMESTAMP) revert("NodeRegistry: stale timestamp");
        if (reason == FUTURE_TIMESTAMP) revert("NodeRegistry: timestamp too far in future");
        if (reason == NODE_REVOKED) revert("NodeRegistry: node revoked");
        revert("NodeRegistry: malformed record");
    }

    /// Store one node-signed record; the caller (an active DC) is the record's DC. Reverts with a
    /// readable reason when the record is refused.
    function register(SignedRecord calldata rec) external {
        _requireActiveDC();
        uint256 p;
        assembly ("memory-safe") {
            p := rec
        }
        uint256 reason = _apply(p, msg.sender, domainSeparator());
        if (reason != OK) _revertReason(reason);
    }

    /// Store many records in one transaction. The caller is checked once (reverts if not an
    /// active DC); each record is checked on its own and a refused record is SKIPPED, reported by
    /// RecordRejected(node, reason): DCs pre-validate, so a reject means a race (e.g. a newer record
    /// landed through another DC) and must not sink the other records. Returns how many were stored.
    function registerBatch(SignedRecord[] calldata recs) external returns (uint256 accepted) {
        _requireActiveDC();
        bytes32 sep = domainSeparator();
        uint256 p;
        uint256 end;
        assembly ("memory-safe") {
            p := recs.offset
            end := add(p, mul(recs.length, 0xa0)) // the ABI decoder checked it lies in calldata
        }
        for (; p < end; ) {
            uint256 reason = _apply(p, msg.sender, sep);
            assembly ("memory-safe") {
                switch reason
                case 0 {
                    accepted := add(accepted, 1)
                }
                default {
                    mstore(0x00, reason)
                    log2(0x00, 0x20, REJECTED_TOPIC, calldataload(p))
                }
                p := add(p, 0xa0)
            }
        }
    }

    /// The stored record of a node (all zero if none).
    function lookup(address node) external view returns (address dc, uint64 timestamp, bool revoked) {
        uint256 stored = _records[node];
        return (address(uint160(stored)), uint64(stored >> 160), stored >> 224 != 0);
    }

    // ------------------------------------------------------------------ DC membership

    modifier onlyOwner() {
        require(msg.sender == owner, "NodeRegistry: not owner");
        _;
    }

    function admitDC(address dc, string calldata hostname, string calldata endpoint) external onlyOwner {
        require(dc != address(0), "NodeRegistry: zero address");
        DC storage d = _dcs[dc];
        require(!d.active, "NodeRegistry: DC already active");
        d.active = true;
        d.hostname = hostname;
        d.endpoint = endpoint;
        _dcList.push(dc);
        _dcIndex[dc] = _dcList.length;
        emit DCAdmitted(dc, hostname, endpoint);
    }

    /// Change a DC's hostname/endpoint: by the owner, or by the active DC itself.
    function updateDC(address dc, string calldata hostname, string calldata endpoint) external {
        require(msg.sender == owner || msg.sender == dc, "NodeRegistry: not owner or the DC");
        DC storage d = _dcs[dc];
        require(d.active, "NodeRegistry: not an active DC");
        d.hostname = hostname;
        d.endpoint = endpoint;
        emit DCUpdated(dc, hostname, endpoint);
    }

    /// Remove a DC: it can no longer submit records. Records naming it stay as they are.
    function removeDC(address dc) external onlyOwner {
        require(_dcs[dc].active, "NodeRegistry: not an active DC");
        delete _dcs[dc];
        uint256 idx = _dcIndex[dc] - 1;
        uint256 last = _dcList.length - 1;
        if (idx != last) {
            address moved = _dcList[last];
            _dcList[idx] = moved;
            _dcIndex[moved] = idx + 1;
        }
        _dcList.pop();
        delete _dcIndex[dc];
        emit DCRemoved(dc);
    }

    function transferOwnership(address newOwner) external onlyOwner {
        require(newOwner != address(0), "NodeRegistry: zero address");
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }

    function dcList() external view returns (address[] memory) {
        return _dcList;
    }

    function getDC(address dc) external view returns (bool active, string memory hostname, string memory endpoint) {
        DC storage d = _dcs[dc];
        return (d.active, d.hostname, d.endpoint);
    }
}
