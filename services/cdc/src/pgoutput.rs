//! A decoder of PostgreSQL's `pgoutput` logical replication messages (protocol version 1).
//!
//! A pure function of bytes: no IO, no allocation beyond the decoded values, and a typed
//! error (never a panic) for anything malformed. Begin and Commit are framed by the transport;
//! they are decoded here too so that captured streams can be replayed whole.

use std::fmt;

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        commit_time_micros: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_micros: i64,
    },
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldTuple,
    },
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    LogicalMessage {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
}

/// `REPLICA IDENTITY` of a relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

/// A table as the stream describes it (sent before its first change, and after DDL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value that did not change: the stream does not carry it.
    UnchangedToast,
    /// Text representation (the output function of the type).
    Text(Vec<u8>),
    Binary(Vec<u8>),
}

/// A row: one value per column of the relation.
pub type Tuple = Vec<Value>;

/// The old row of an update or delete: the key columns only, or the whole row with
/// `REPLICA IDENTITY FULL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    Key(Tuple),
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            Self::Key(t) | Self::Full(t) => t,
        }
    }
}

/// Why bytes are not a pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    UnknownTag(u8),
    Truncated {
        tag: u8,
        needed: usize,
        at: usize,
    },
    UnterminatedString {
        tag: u8,
        at: usize,
    },
    NotUtf8 {
        tag: u8,
        at: usize,
    },
    UnknownTupleKind {
        tag: u8,
        kind: u8,
        at: usize,
    },
    UnexpectedByte {
        tag: u8,
        expected: &'static str,
        found: u8,
        at: usize,
    },
    Negative {
        tag: u8,
        what: &'static str,
        value: i64,
    },
    TrailingBytes {
        tag: u8,
        count: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("empty pgoutput message"),
            Self::UnknownTag(t) => write!(f, "unknown pgoutput message tag {:?}", char::from(*t)),
            Self::Truncated { tag, needed, at } => {
                write!(
                    f,
                    "{:?} message truncated: {needed} more bytes needed at offset {at}",
                    char::from(*tag)
                )
            }
            Self::UnterminatedString { tag, at } => {
                write!(
                    f,
                    "{:?} message: string at offset {at} has no terminator",
                    char::from(*tag)
                )
            }
            Self::NotUtf8 { tag, at } => write!(
                f,
                "{:?} message: string at offset {at} is not UTF-8",
                char::from(*tag)
            ),
            Self::UnknownTupleKind { tag, kind, at } => write!(
                f,
                "{:?} message: unknown column kind {:?} at offset {at}",
                char::from(*tag),
                char::from(*kind)
            ),
            Self::UnexpectedByte {
                tag,
                expected,
                found,
                at,
            } => write!(
                f,
                "{:?} message: expected {expected} at offset {at}, found {:?}",
                char::from(*tag),
                char::from(*found)
            ),
            Self::Negative { tag, what, value } => {
                write!(f, "{:?} message: negative {what} {value}", char::from(*tag))
            }
            Self::TrailingBytes { tag, count } => {
                write!(
                    f,
                    "{:?} message: {count} unexpected trailing bytes",
                    char::from(*tag)
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

struct Reader<'a> {
    tag: u8,
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(DecodeError::Truncated {
                tag: self.tag,
                needed: n.saturating_sub(self.buf.len().saturating_sub(self.at)),
                at: self.at,
            })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.i32().map(|v| v as u32)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.i64().map(|v| v as u64)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.at.min(self.buf.len())..];
        let len = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::UnterminatedString {
                tag: self.tag,
                at: self.at,
            })?;
        let s = std::str::from_utf8(&rest[..len])
            .map_err(|_| DecodeError::NotUtf8 {
                tag: self.tag,
                at: self.at,
            })?
            .to_owned();
        self.at += len + 1;
        Ok(s)
    }

    fn count(&mut self, what: &'static str, value: i64) -> Result<usize, DecodeError> {
        usize::try_from(value).map_err(|_| DecodeError::Negative {
            tag: self.tag,
            what,
            value,
        })
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = i64::from(self.i16()?);
        let n = self.count("column count", n)?;
        // Every column takes at least one byte: a count beyond the rest is malformed, and
        // must not drive a huge allocation.
        if n > self.buf.len().saturating_sub(self.at) {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                needed: n,
                at: self.at,
            });
        }
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let at = self.at;
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = i64::from(self.i32()?);
                    let len = self.count("value length", len)?;
                    let bytes = self.take(len)?.to_vec();
                    if kind == b't' {
                        Value::Text(bytes)
                    } else {
                        Value::Binary(bytes)
                    }
                }
                kind => {
                    return Err(DecodeError::UnknownTupleKind {
                        tag: self.tag,
                        kind,
                        at,
                    });
                }
            });
        }
        Ok(values)
    }

    fn expect(&mut self, expected: &'static str, allowed: &[u8]) -> Result<u8, DecodeError> {
        let at = self.at;
        let b = self.u8()?;
        if allowed.contains(&b) {
            Ok(b)
        } else {
            Err(DecodeError::UnexpectedByte {
                tag: self.tag,
                expected,
                found: b,
                at,
            })
        }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len().saturating_sub(self.at) {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                tag: self.tag,
                count,
            }),
        }
    }
}

/// Decodes one pgoutput message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let (&tag, _) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        tag,
        buf: bytes,
        at: 1,
    };
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time_micros: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: r.u64()?,
            end_lsn: r.u64()?,
            commit_time_micros: r.i64()?,
        },
        b'O' => Message::Origin {
            commit_lsn: r.u64()?,
            name: r.string()?,
        },
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = match r.expect("a replica identity (d, n, f or i)", b"dnfi")? {
                b'd' => ReplicaIdentity::Default,
                b'n' => ReplicaIdentity::Nothing,
                b'f' => ReplicaIdentity::Full,
                _ => ReplicaIdentity::Index,
            };
            let n = i64::from(r.i16()?);
            let n = r.count("column count", n)?;
            if n > bytes.len() {
                return Err(DecodeError::Truncated {
                    tag,
                    needed: n,
                    at: r.at,
                });
            }
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32()?,
            namespace: r.string()?,
            name: r.string()?,
        },
        b'I' => {
            let relation = r.u32()?;
            r.expect("'N' (new tuple)", b"N")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let old = match r.expect("'K', 'O' or 'N'", b"KON")? {
                b'K' => {
                    let t = r.tuple()?;
                    r.expect("'N' (new tuple)", b"N")?;
                    Some(OldTuple::Key(t))
                }
                b'O' => {
                    let t = r.tuple()?;
                    r.expect("'N' (new tuple)", b"N")?;
                    Some(OldTuple::Full(t))
                }
                _ => None,
            };
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let old = match r.expect("'K' or 'O'", b"KO")? {
                b'K' => OldTuple::Key(r.tuple()?),
                _ => OldTuple::Full(r.tuple()?),
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let n = i64::from(r.i32()?);
            let n = r.count("relation count", n)?;
            let options = r.u8()?;
            if n > bytes.len() {
                return Err(DecodeError::Truncated {
                    tag,
                    needed: n * 4,
                    at: r.at,
                });
            }
            let relations = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate { options, relations }
        }
        b'M' => {
            let transactional = r.u8()? & 1 == 1;
            let lsn = r.u64()?;
            let prefix = r.string()?;
            let len = i64::from(r.i32()?);
            let len = r.count("content length", len)?;
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content: r.take(len)?.to_vec(),
            }
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    r.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend_from_slice(&16_384u32.to_be_bytes());
        b.extend_from_slice(b"app\0users\0");
        b.push(b'd');
        b.extend_from_slice(&2i16.to_be_bytes());
        b.push(1);
        b.extend_from_slice(b"id\0");
        b.extend_from_slice(&20u32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.push(0);
        b.extend_from_slice(b"email\0");
        b.extend_from_slice(&25u32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b
    }

    fn insert_bytes() -> Vec<u8> {
        let mut b = vec![b'I'];
        b.extend_from_slice(&16_384u32.to_be_bytes());
        b.push(b'N');
        b.extend_from_slice(&2i16.to_be_bytes());
        b.push(b't');
        b.extend_from_slice(&2i32.to_be_bytes());
        b.extend_from_slice(b"42");
        b.push(b'n');
        b
    }

    #[test]
    fn decodes_relation_and_insert() {
        let Message::Relation(rel) = decode(&relation_bytes()).expect("relation") else {
            panic!("not a relation")
        };
        assert_eq!(rel.name, "users");
        assert!(rel.columns[0].key);
        assert_eq!(rel.columns[1].type_oid, 25);
        assert_eq!(
            decode(&insert_bytes()).expect("insert"),
            Message::Insert {
                relation: 16_384,
                new: vec![Value::Text(b"42".to_vec()), Value::Null]
            }
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for msg in [relation_bytes(), insert_bytes()] {
            for cut in 0..msg.len() {
                assert!(
                    decode(&msg[..cut]).is_err(),
                    "cut {cut} of {:?}",
                    char::from(msg[0])
                );
            }
        }
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownTag(b'Z')));
        let mut bad_kind = insert_bytes();
        let at = bad_kind.len() - 1;
        bad_kind[at] = b'x';
        assert!(matches!(
            decode(&bad_kind),
            Err(DecodeError::UnknownTupleKind { kind: b'x', .. })
        ));
        let mut trailing = insert_bytes();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing),
            Err(DecodeError::TrailingBytes { count: 1, .. })
        ));
        // A huge column count must not allocate.
        let mut huge = vec![b'I', 0, 0, 0, 1, b'N'];
        huge.extend_from_slice(&i16::MAX.to_be_bytes());
        assert!(decode(&huge).is_err());
        let mut negative = vec![b'I', 0, 0, 0, 1, b'N'];
        negative.extend_from_slice(&(-1i16).to_be_bytes());
        assert!(matches!(
            decode(&negative),
            Err(DecodeError::Negative { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn mutated_real_messages_never_panic(i in 0usize..64, b in proptest::num::u8::ANY) {
            for mut msg in [relation_bytes(), insert_bytes()] {
                let at = i % msg.len();
                msg[at] = b;
                let _ = decode(&msg);
            }
        }
    }
}
