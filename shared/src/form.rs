//! Decodes Bitrix24's `application/x-www-form-urlencoded` bodies (`data[FIELDS][ID]=9`) into
//! the JSON that PHP's `parse_str` + `json_encode` make of them. The trap: these are PHP arrays,
//! so `a[1]=x&a[0]=y` is an object, `a[]` appends after the top integer key, odd keys get mangled.

use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// Limits on untrusted input; defaults: `max_depth` 32 (nesting levels of brackets),
/// `max_keys` 1000 (key=value pairs), `max_key_len` 256 bytes (decoded key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormLimits {
    pub max_depth: usize,
    pub max_keys: usize,
    pub max_key_len: usize,
}

impl Default for FormLimits {
    fn default() -> Self {
        Self {
            max_depth: 32,
            max_keys: 1000,
            max_key_len: 256,
        }
    }
}

/// Which half of a `key=value` pair an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormPart {
    Key,
    Value,
}

impl fmt::Display for FormPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Key => "key",
            Self::Value => "value",
        })
    }
}

/// Why a form body was refused. Messages name keys (cut to 40 characters, control
/// characters escaped) and never values, which may be tokens.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FormError {
    #[error("form has {count} fields, at most {max} allowed")]
    TooManyFields { count: usize, max: usize },
    #[error("form key `{key}` is {len} bytes long, at most {max} allowed")]
    KeyTooLong { key: String, len: usize, max: usize },
    #[error("form key `{key}` nesting is {depth} levels deep, at most {max} allowed")]
    TooDeep {
        key: String,
        depth: usize,
        max: usize,
    },
    #[error(
        "form body is not valid UTF-8 after percent-decoding (in the {part} of field {field})"
    )]
    InvalidUtf8 { field: usize, part: FormPart },
}

/// Decodes `body` the way PHP fills `$_POST` / `parse_str`, rendered as `json_encode` would.
///
/// The top level is always a JSON object (PHP would turn `0=a` into the list `["a"]`; every
/// Bitrix24 body has named fields, and callers want an object). Nested arrays whose keys are
/// exactly 0..n-1 in order become JSON arrays, all others objects. Unlike PHP, a key nested
/// deeper than `max_depth`, too many fields, an over-long key or non-UTF-8 text is an error
/// rather than silently dropped.
///
/// # Errors
///
/// [`FormError`] when a limit is exceeded or decoded text is not UTF-8; nothing of the body
/// is returned then.
pub fn decode_form(body: &[u8], limits: &FormLimits) -> Result<Value, FormError> {
    let pairs = || body.split(|&b| b == b'&').filter(|p| !p.is_empty());
    // Checked before any decoding so an oversized body costs a linear scan and no allocation.
    // Counting every `&` vectorises; only a body that might be over the limit is split exactly.
    let upper_bound = body.iter().filter(|&&b| b == b'&').count() + 1;
    if upper_bound > limits.max_keys {
        let count = pairs().count();
        if count > limits.max_keys {
            return Err(FormError::TooManyFields {
                count,
                max: limits.max_keys,
            });
        }
    }

    let mut root = PhpArray::default();
    // Reused for every pair; each value is copied out once, at its exact size.
    let mut key_buf = Vec::new();
    let mut value_buf = Vec::new();
    let mut field = 0;
    let mut rest = body;
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'&' {
            rest = tail;
            continue;
        }
        field += 1;
        // The pair splits at the first raw `=` and ends at the next raw `&`, so encoded
        // `%3D` and `%26` are data; decoding and splitting happen in one pass.
        key_buf.clear();
        let after_key = url_decode_until(rest, &mut key_buf, true);
        value_buf.clear();
        rest = match after_key.split_first() {
            Some((b'=', raw_value)) => url_decode_until(raw_value, &mut value_buf, false),
            _ => after_key,
        };

        if key_buf.len() > limits.max_key_len {
            return Err(FormError::KeyTooLong {
                key: excerpt(&key_buf),
                len: key_buf.len(),
                max: limits.max_key_len,
            });
        }
        let key = std::str::from_utf8(&key_buf).map_err(|_| FormError::InvalidUtf8 {
            field,
            part: FormPart::Key,
        })?;
        let value = std::str::from_utf8(&value_buf).map_err(|_| FormError::InvalidUtf8 {
            field,
            part: FormPart::Value,
        })?;

        match parse_key(key, limits.max_depth) {
            Ok(Some(path)) => root.assign(&path, value.to_owned()),
            Ok(None) => {}
            Err(depth) => {
                return Err(FormError::TooDeep {
                    key: excerpt(key.as_bytes()),
                    depth,
                    max: limits.max_depth,
                })
            }
        }
    }
    Ok(Value::Object(root.into_object()))
}

/// Whether a raw form or JSON body (or query string) may decode to text holding a NUL:
/// it has a NUL byte, a `%00` or a JSON `\u0000`. A cheap scan, so that the decoded
/// value is only walked ([`nul_field`]) when it might hold one.
pub fn may_hold_nul(raw: &[u8]) -> bool {
    raw.iter().enumerate().any(|(i, &b)| match b {
        0 => true,
        b'%' => raw.get(i + 1..i + 3) == Some(&b"00"[..]),
        b'\\' => raw.get(i + 1..i + 6) == Some(&b"u0000"[..]),
        _ => false,
    })
}

/// The first field of a decoded body whose key or value holds a NUL (U+0000), named
/// as PHP would (`data[FIELDS][TITLE]`, `data[LIST][1]`; each key cut to 40 characters,
/// control characters escaped), or `None`. PostgreSQL cannot store a NUL in `jsonb` or
/// `text`, so such a body would be written nowhere.
pub fn nul_field(value: &Value) -> Option<String> {
    let mut path = Vec::new();
    if find_nul(value, &mut path) {
        let mut name = String::new();
        for (depth, part) in path.iter().enumerate() {
            if depth == 0 {
                name.push_str(part);
            } else {
                name.push('[');
                name.push_str(part);
                name.push(']');
            }
        }
        Some(name)
    } else {
        None
    }
}

/// Depth-first search for a NUL; on success `path` holds the keys leading to it.
fn find_nul(value: &Value, path: &mut Vec<String>) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().enumerate().any(|(i, v)| {
            path.push(i.to_string());
            let found = find_nul(v, path);
            if !found {
                path.pop();
            }
            found
        }),
        Value::Object(map) => map.iter().any(|(k, v)| {
            path.push(excerpt(k.as_bytes()));
            let found = k.contains('\0') || find_nul(v, path);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    }
}

/// PHP's `urldecode` of `src` up to the first raw `&` (or `=` if `stop_at_eq`), appended to
/// `out`; returns what follows. `+` is a space and a `%` not followed by two hex digits
/// stays literal.
fn url_decode_until<'a>(src: &'a [u8], out: &mut Vec<u8>, stop_at_eq: bool) -> &'a [u8] {
    let mut rest = src;
    loop {
        // Plain runs are copied in bulk: a push per byte costs several times more.
        let plain = rest
            .iter()
            .position(|&b| matches!(b, b'%' | b'+' | b'&') || (stop_at_eq && b == b'='))
            .unwrap_or(rest.len());
        let (run, mut special) = rest.split_at(plain);
        if !run.is_empty() {
            out.extend_from_slice(run);
        }
        // Escapes come in runs (`%D0%9F` is one Cyrillic letter), decoded without a new scan.
        loop {
            match special {
                [b'%', hi, lo, after @ ..] if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                    out.push(hex_value(*hi) << 4 | hex_value(*lo));
                    special = after;
                }
                [b'+', after @ ..] => {
                    out.push(b' ');
                    special = after;
                }
                [b'%', after @ ..] => {
                    out.push(b'%');
                    special = after;
                }
                // `&`, the `=` that ends a key, or the end of the body.
                [b'&', ..] | [] => return special,
                [b'=', ..] if stop_at_eq => return special,
                _ => break,
            }
        }
        rest = special;
    }
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

/// A key for error messages: at most 40 characters, control characters escaped so the
/// message stays on one line.
fn excerpt(key: &[u8]) -> String {
    const MAX_CHARS: usize = 40;
    // Only the head is converted: an over-long key may be megabytes.
    let head = &key[..key.len().min(MAX_CHARS * 4)];
    let text = String::from_utf8_lossy(head);
    let mut chars = text.chars();
    let mut out: String = chars
        .by_ref()
        .take(MAX_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if chars.next().is_some() || head.len() < key.len() {
        out.push('…');
    }
    out
}

/// One bracket group of a key: `[]` or `[index]`.
enum Seg<'k> {
    Append,
    Key(&'k str),
}

/// A key split as PHP's `php_register_variable_ex` splits it.
struct Path<'k> {
    name: Cow<'k, str>,
    segs: Vec<Seg<'k>>,
}

/// Splits a decoded key into its top-level name and bracket groups. `Ok(None)` means PHP
/// ignores the pair (empty name); `Err(levels)` means more than `max_depth` bracket groups,
/// counted as PHP counts them (every group it starts reading, even an unclosed one).
fn parse_key(key: &str, max_depth: usize) -> Result<Option<Path<'_>>, usize> {
    // PHP reads the name as a C string, so a decoded NUL ends it.
    let key = match split_once_byte(key, 0) {
        Some((head, _)) => head,
        None => key,
    };
    let key = key.trim_start_matches(' ');
    let (base, mut group) = match split_once_byte(key, b'[') {
        Some((base, rest)) => (base, Some(rest)),
        None => (key, None),
    };
    if base.is_empty() {
        return Ok(None);
    }
    let mut name = underscore(base, b" .");
    let mut segs = Vec::new();
    let mut levels = 0usize;
    while let Some(inner) = group {
        levels += 1;
        // PHP skips one whitespace character before looking for `]`, so `[ ]` appends,
        // but keeps it in the index otherwise (`[ b]` is the key " b").
        let trimmed = match inner.as_bytes() {
            [b' ' | b'\t' | b'\n' | b'\x0B' | b'\x0C' | b'\r', ..] => {
                inner.get(1..).unwrap_or_default()
            }
            _ => inner,
        };
        let (seg, after) = if let Some(after) = trimmed.strip_prefix(']') {
            (Seg::Append, after)
        } else if let Some((index, after)) = split_once_byte(inner, b']') {
            (Seg::Key(index), after)
        } else {
            // No closing bracket: in the first group PHP turns that `[` into `_` and keeps the
            // rest as part of the name; deeper, the key simply ends at the previous group.
            if levels == 1 {
                let name = name.to_mut();
                name.push('_');
                name.push_str(&underscore(inner, b" .["));
            }
            break;
        };
        if levels <= max_depth {
            segs.push(seg);
        }
        // Anything after `]` other than a new `[` is ignored, as PHP does.
        group = after.strip_prefix('[');
    }
    if levels > max_depth {
        return Err(levels);
    }
    Ok(Some(Path { name, segs }))
}

/// `str::split_once` for an ASCII byte, without the `char` pattern machinery: this runs for
/// every bracket of every key.
fn split_once_byte(s: &str, byte: u8) -> Option<(&str, &str)> {
    let at = s.bytes().position(|b| b == byte)?;
    Some((s.get(..at)?, s.get(at + 1..)?))
}

/// PHP's name mangling: each of the ASCII bytes `from` becomes `_`.
fn underscore<'a>(s: &'a str, from: &[u8]) -> Cow<'a, str> {
    if s.bytes().any(|b| from.contains(&b)) {
        Cow::Owned(
            s.chars()
                .map(|c| {
                    if u8::try_from(c).is_ok_and(|b| from.contains(&b)) {
                        '_'
                    } else {
                        c
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

/// Whether PHP stores this array key as an integer: canonical decimal within i64.
fn classify(key: &str) -> KeyRef<'_> {
    let digits = key.strip_prefix('-').unwrap_or(key);
    let canonical = match digits.as_bytes() {
        [b'0'] => digits.len() == key.len(), // "0" is an integer, "-0" is not
        [first, rest @ ..] => (b'1'..=b'9').contains(first) && rest.iter().all(u8::is_ascii_digit),
        [] => false,
    };
    // Canonical but out of range ("9223372036854775808") stays a string, as in PHP.
    canonical
        .then(|| key.parse::<i64>().ok())
        .flatten()
        .map_or(KeyRef::Str(key), KeyRef::Int)
}

#[derive(Clone, Copy, Hash)]
enum KeyRef<'a> {
    Int(i64),
    Str(&'a str),
}

enum Key {
    Int(i64),
    Str(Box<str>),
}

impl Key {
    fn as_ref(&self) -> KeyRef<'_> {
        match self {
            Self::Int(n) => KeyRef::Int(*n),
            Self::Str(s) => KeyRef::Str(s),
        }
    }

    fn matches(&self, other: KeyRef<'_>) -> bool {
        match (self, other) {
            (Self::Int(a), KeyRef::Int(b)) => *a == b,
            (Self::Str(a), KeyRef::Str(b)) => **a == *b,
            _ => false,
        }
    }
}

enum Node {
    Str(String),
    Arr(PhpArray),
}

/// Turns a scalar into an empty array in place (keeping its position), as PHP does when a
/// later key goes deeper than an earlier one.
fn as_array(node: &mut Node) -> Option<&mut PhpArray> {
    if let Node::Str(_) = node {
        *node = Node::Arr(PhpArray::default());
    }
    match node {
        Node::Arr(arr) => Some(arr),
        Node::Str(_) => None,
    }
}

/// Arrays this small are searched linearly; most Bitrix24 arrays have a handful of keys,
/// and a hash index for each would cost more than it saves.
const LINEAR_SCAN_MAX: usize = 8;

/// A PHP array: insertion-ordered, integer and string keys, with PHP's next-append index.
#[derive(Default)]
struct PhpArray {
    entries: Vec<(Key, Node)>,
    index: Option<Box<KeyIndex>>,
    /// `None` until an integer key is stored, so the first append uses 0; afterwards the
    /// largest integer key + 1 (negative ones included, as in PHP 8), saturating at `i64::MAX`.
    next_free: Option<i64>,
}

/// Maps each key's hash to its position, so that key strings are neither stored twice nor
/// hashed twice. The hash is SipHash with a random key, so it cannot be aimed at; keys that
/// share one anyway (vanishingly rare) are listed in `collisions`.
struct KeyIndex {
    hasher: RandomState,
    slots: HashMap<u64, usize, BuildHasherDefault<HashIsKey>>,
    collisions: Vec<(u64, usize)>,
}

impl KeyIndex {
    fn new(entries: &[(Key, Node)]) -> Self {
        let mut index = Self {
            hasher: RandomState::new(),
            slots: HashMap::with_capacity_and_hasher(
                entries.len() * 2,
                BuildHasherDefault::default(),
            ),
            collisions: Vec::new(),
        };
        for (pos, (key, _)) in entries.iter().enumerate() {
            index.add(index.hash(key.as_ref()), pos);
        }
        index
    }

    fn hash(&self, key: KeyRef<'_>) -> u64 {
        self.hasher.hash_one(key)
    }

    fn add(&mut self, hash: u64, pos: usize) {
        match self.slots.entry(hash) {
            Entry::Vacant(slot) => {
                slot.insert(pos);
            }
            Entry::Occupied(_) => self.collisions.push((hash, pos)),
        }
    }

    fn candidates(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let more = self.collisions.iter().filter(move |(h, _)| *h == hash);
        self.slots
            .get(&hash)
            .copied()
            .into_iter()
            .chain(more.map(|&(_, pos)| pos))
    }
}

/// The keys of `KeyIndex::slots` are already hashes.
#[derive(Default)]
struct HashIsKey(u64);

impl Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached (u64 keys use `write_u64`); mixes anyway rather than panic.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Where a key is, or (in an indexed array) the hash to file it under if it is new.
enum Lookup {
    Found(usize),
    Missing(Option<u64>),
}

impl PhpArray {
    fn find(&self, key: KeyRef<'_>) -> Lookup {
        let is_key = |pos: &usize| self.entries.get(*pos).is_some_and(|(k, _)| k.matches(key));
        match &self.index {
            None => match (0..self.entries.len()).find(is_key) {
                Some(pos) => Lookup::Found(pos),
                None => Lookup::Missing(None),
            },
            Some(index) => {
                let hash = index.hash(key);
                match index.candidates(hash).find(is_key) {
                    Some(pos) => Lookup::Found(pos),
                    None => Lookup::Missing(Some(hash)),
                }
            }
        }
    }

    /// Adds a key known to be absent; `hash` is what `find` returned for it.
    fn push(&mut self, key: KeyRef<'_>, hash: Option<u64>, node: Node) -> usize {
        let owned = match key {
            KeyRef::Int(n) => {
                if self.next_free.is_none_or(|next| n >= next) {
                    self.next_free = Some(n.saturating_add(1));
                }
                Key::Int(n)
            }
            KeyRef::Str(s) => Key::Str(s.into()),
        };
        let pos = self.entries.len();
        self.entries.push((owned, node));
        match &mut self.index {
            Some(index) => {
                let hash = hash.unwrap_or_else(|| index.hash(key));
                index.add(hash, pos);
            }
            None if self.entries.len() > LINEAR_SCAN_MAX => {
                self.index = Some(Box::new(KeyIndex::new(&self.entries)));
            }
            None => {}
        }
        pos
    }

    /// `zend_symtable_update`: an existing key keeps its position, whatever it held.
    fn set(&mut self, key: KeyRef<'_>, node: Node) {
        match self.find(key) {
            Lookup::Found(pos) => {
                if let Some(entry) = self.entries.get_mut(pos) {
                    entry.1 = node;
                }
            }
            Lookup::Missing(hash) => {
                self.push(key, hash, node);
            }
        }
    }

    /// `zend_hash_next_index_insert`; `None` when the next index is taken, which only
    /// happens once `i64::MAX` is used, and PHP then drops the value.
    fn append(&mut self, node: Node) -> Option<&mut Node> {
        let key = KeyRef::Int(self.next_free.unwrap_or(0));
        let Lookup::Missing(hash) = self.find(key) else {
            return None;
        };
        let pos = self.push(key, hash, node);
        self.entries.get_mut(pos).map(|entry| &mut entry.1)
    }

    /// The array stored under `key`, created (or replacing a scalar) if needed.
    fn child(&mut self, key: KeyRef<'_>) -> Option<&mut PhpArray> {
        let pos = match self.find(key) {
            Lookup::Found(pos) => pos,
            Lookup::Missing(hash) => self.push(key, hash, Node::Arr(PhpArray::default())),
        };
        self.entries
            .get_mut(pos)
            .and_then(|entry| as_array(&mut entry.1))
    }

    /// Stores one pair. The top level takes string keys only: see `decode_form`.
    fn assign(&mut self, path: &Path<'_>, value: String) {
        let top = KeyRef::Str(&path.name);
        let Some((last, inner)) = path.segs.split_last() else {
            self.set(top, Node::Str(value));
            return;
        };
        let Some(mut cur) = self.child(top) else {
            return;
        };
        for seg in inner {
            let next = match seg {
                Seg::Append => cur
                    .append(Node::Arr(PhpArray::default()))
                    .and_then(as_array),
                Seg::Key(key) => cur.child(classify(key)),
            };
            let Some(next) = next else {
                return;
            };
            cur = next;
        }
        match last {
            Seg::Append => {
                cur.append(Node::Str(value));
            }
            Seg::Key(key) => cur.set(classify(key), Node::Str(value)),
        }
    }

    /// `json_encode`'s rule: a list only if the keys are exactly 0..n-1 in order.
    fn is_list(&self) -> bool {
        self.entries
            .iter()
            .enumerate()
            .all(|(i, (key, _))| matches!(key, Key::Int(n) if usize::try_from(*n) == Ok(i)))
    }

    fn into_value(self) -> Value {
        if self.is_list() {
            Value::Array(
                self.entries
                    .into_iter()
                    .map(|(_, node)| node.into_value())
                    .collect(),
            )
        } else {
            Value::Object(self.into_object())
        }
    }

    fn into_object(self) -> Map<String, Value> {
        self.entries
            .into_iter()
            .map(|(key, node)| {
                let key = match key {
                    Key::Int(n) => n.to_string(),
                    Key::Str(s) => s.into_string(),
                };
                (key, node.into_value())
            })
            .collect()
    }
}

impl Node {
    // Recursion depth is bounded by `max_depth`, checked before the tree was built.
    fn into_value(self) -> Value {
        match self {
            Node::Str(s) => Value::String(s),
            Node::Arr(arr) => arr.into_value(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn decode(body: &str) -> Value {
        decode_form(body.as_bytes(), &FormLimits::default()).expect(body)
    }

    fn decode_err(body: &[u8], limits: &FormLimits) -> FormError {
        decode_form(body, limits).expect_err("should be refused")
    }

    #[test]
    fn bitrix24_event_decodes_to_nested_object() {
        let body = "event=ONCRMDEALRECURRINGEXPOSE&event_handler_id=683\
            &data[FIELDS][ID]=9&data[FIELDS][RECURRING_DEAL_ID]=6791&data[FIELDS][DEAL_ID]=6799\
            &ts=1741092489&auth[access_token]=s6p6eclrvim6da22ft9ch94ekreb52lv\
            &auth[domain]=some-domain.bitrix24.com\
            &auth[member_id]=a223c6b3710f85df22e9377d6c4f7553";
        assert_eq!(
            decode(body),
            json!({
                "event": "ONCRMDEALRECURRINGEXPOSE",
                "event_handler_id": "683",
                "data": {"FIELDS": {"ID": "9", "RECURRING_DEAL_ID": "6791", "DEAL_ID": "6799"}},
                "ts": "1741092489",
                "auth": {
                    "access_token": "s6p6eclrvim6da22ft9ch94ekreb52lv",
                    "domain": "some-domain.bitrix24.com",
                    "member_id": "a223c6b3710f85df22e9377d6c4f7553"
                }
            })
        );
        // Bitrix24 sends the brackets percent-encoded as often as not.
        assert_eq!(
            decode("data%5BFIELDS%5D%5BID%5D=9"),
            json!({"data": {"FIELDS": {"ID": "9"}}})
        );
    }

    #[test]
    fn empty_brackets_append_in_order() {
        assert_eq!(decode("a[]=1&a[]=2"), json!({"a": ["1", "2"]}));
        assert_eq!(
            decode("a[][]=1&a[][]=2&a[][x]=3"),
            json!({"a": [["1"], ["2"], {"x": "3"}]})
        );
    }

    #[test]
    fn integer_keys_out_of_order_render_as_object() {
        let v = decode("a[1]=x&a[0]=y");
        assert_eq!(v, json!({"a": {"1": "x", "0": "y"}}));
        assert!(v["a"].is_object());
        assert!(decode("a[1]=x")["a"].is_object());
        assert!(decode("a[0]=x&a[k]=y")["a"].is_object());
    }

    #[test]
    fn integer_keys_in_order_render_as_list() {
        assert_eq!(decode("a[0]=x&a[1]=y"), json!({"a": ["x", "y"]}));
        // Overwriting keeps the original position, so this is still 0, 1.
        assert_eq!(decode("a[0]=x&a[1]=y&a[0]=z"), json!({"a": ["z", "y"]}));
        assert_eq!(decode("a[]=x&a[1]=y"), json!({"a": ["x", "y"]}));
    }

    #[test]
    fn append_continues_after_largest_integer_key() {
        assert_eq!(
            decode("a[1]=x&a[]=y&a[k]=z&a[]=w"),
            json!({"a": {"1": "x", "2": "y", "k": "z", "3": "w"}})
        );
        assert_eq!(
            decode("a[5]=x&a[-7]=y&a[]=z"),
            json!({"a": {"5": "x", "-7": "y", "6": "z"}})
        );
        // PHP 8: the next index after only negative keys is max + 1, not 0.
        assert_eq!(
            decode("a[-5]=x&a[]=y"),
            json!({"a": {"-5": "x", "-4": "y"}})
        );
        assert_eq!(decode("a[k]=x&a[]=y"), json!({"a": {"k": "x", "0": "y"}}));
    }

    #[test]
    fn append_after_i64_max_is_dropped() {
        assert_eq!(
            decode("a[9223372036854775806]=1&a[]=2&a[]=3&a[][x]=4"),
            json!({"a": {"9223372036854775806": "1", "9223372036854775807": "2"}})
        );
    }

    #[test]
    fn only_canonical_decimal_indexes_are_integers() {
        // Each of these is a string key, so `[]` still starts at 0.
        for key in [
            "-0",
            "01",
            "+1",
            " 1",
            "1 ",
            "1.0",
            "0x1",
            "9223372036854775808",
            "-9223372036854775809",
        ] {
            let v = decode(&format!("a[{}]=x&a[]=y", php_urlencode(key)));
            assert_eq!(v, json!({"a": {key: "x", "0": "y"}}), "{key}");
        }
        assert_eq!(
            decode("a[-9223372036854775808]=x&a[]=y"),
            json!({"a": {"-9223372036854775808": "x", "-9223372036854775807": "y"}})
        );
        assert_eq!(decode("a[0]=x&a[]=y"), json!({"a": ["x", "y"]}));
        assert_eq!(
            decode("a[12]=x&a[]=y"),
            json!({"a": {"12": "x", "13": "y"}})
        );
        assert_eq!(
            decode("a[-3]=x&a[]=y"),
            json!({"a": {"-3": "x", "-2": "y"}})
        );
    }

    #[test]
    fn top_level_names_are_mangled_and_stay_strings() {
        assert_eq!(decode("a.b c=1"), json!({"a_b_c": "1"}));
        assert_eq!(decode("a.b[c.d e]=1"), json!({"a_b": {"c.d e": "1"}}));
        assert_eq!(decode("++%20a=1"), json!({"a": "1"}));
        assert_eq!(decode("a+=1"), json!({"a_": "1"}));
        // A tab is not a space to PHP here.
        assert_eq!(decode("%09a=1"), json!({"\ta": "1"}));
        // PHP would render this as the list ["a", "b"]; our top level is always an object.
        assert_eq!(decode("0=a&1=b"), json!({"0": "a", "1": "b"}));
        assert_eq!(decode("a.b=1&a_b=2"), json!({"a_b": "2"}));
    }

    #[test]
    fn empty_names_are_skipped() {
        assert_eq!(
            decode("=x&[a]=y&+=z&++[b]=w&%00a=v&ok=1"),
            json!({"ok": "1"})
        );
    }

    #[test]
    fn unclosed_bracket_becomes_part_of_the_name() {
        assert_eq!(decode("a[b=1"), json!({"a_b": "1"}));
        assert_eq!(decode("a[b.c d[e=1"), json!({"a_b_c_d_e": "1"}));
        assert_eq!(decode("a.b c[x=1"), json!({"a_b_c_x": "1"}));
        assert_eq!(decode("a]b[c=1"), json!({"a]b_c": "1"}));
        // Past the first group the key just ends at the last complete group.
        assert_eq!(decode("a[b][c=1"), json!({"a": {"b": "1"}}));
        assert_eq!(decode("a[][c=1&a[][=2"), json!({"a": ["1", "2"]}));
    }

    #[test]
    fn text_after_a_closing_bracket_is_ignored() {
        assert_eq!(decode("a[b]x[c]=1"), json!({"a": {"b": "1"}}));
        assert_eq!(decode("a[b]]=1"), json!({"a": {"b": "1"}}));
        assert_eq!(decode("a[[b]=1"), json!({"a": {"[b": "1"}}));
        assert_eq!(decode("a[ [b]=1"), json!({"a": {" [b": "1"}}));
    }

    #[test]
    fn one_whitespace_character_before_the_bracket_means_append() {
        assert_eq!(
            decode("a[ ]=1&a[%09]=2&a[%0B]=3&a[%0D]=4"),
            json!({"a": ["1", "2", "3", "4"]})
        );
        assert_eq!(decode("a[  ]=1"), json!({"a": {"  ": "1"}}));
        assert_eq!(decode("a[ b]=1"), json!({"a": {" b": "1"}}));
        assert_eq!(decode("a[%0Db]=1"), json!({"a": {"\rb": "1"}}));
    }

    #[test]
    fn later_assignments_overwrite() {
        assert_eq!(decode("a=1&a=2"), json!({"a": "2"}));
        // A scalar is replaced by an array when a later key goes deeper...
        assert_eq!(decode("a=1&a[b]=2"), json!({"a": {"b": "2"}}));
        assert_eq!(decode("a[b]=1&a[b][c]=2"), json!({"a": {"b": {"c": "2"}}}));
        // ...and a scalar replaces an array.
        assert_eq!(decode("a[b]=2&a=1"), json!({"a": "1"}));
        assert_eq!(decode("a[b][c]=1&a[b]=2"), json!({"a": {"b": "2"}}));
        assert_eq!(
            decode("a[x]=1&a[y]=2&a[x][z]=3"),
            json!({"a": {"x": {"z": "3"}, "y": "2"}})
        );
        // The replaced scalar keeps its position, so the list survives.
        assert_eq!(decode("a[0]=1&a[1]=2&a[0][]=3"), json!({"a": [["3"], "2"]}));
    }

    #[test]
    fn percent_decoding_matches_php_urldecode() {
        assert_eq!(decode("a=x+y%20z%2B"), json!({"a": "x y z+"}));
        assert_eq!(decode("a=%c3%A9t%C3%a9"), json!({"a": "été"}));
        assert_eq!(decode("a=%zz%4%%41%"), json!({"a": "%zz%4%A%"}));
        assert_eq!(decode("%zz=1"), json!({"%zz": "1"}));
        assert_eq!(decode("a%3Db=c%26d"), json!({"a=b": "c&d"}));
        assert_eq!(decode("a=b=c"), json!({"a": "b=c"}));
    }

    #[test]
    fn a_nul_is_found_and_named_by_its_field() {
        let v: Value = serde_json::json!({
            "event": "X",
            "data": {"FIELDS": {"ID": "1", "TITLE": "a\u{0}b"}, "LIST": ["x", "y"]},
        });
        assert_eq!(nul_field(&v).as_deref(), Some("data[FIELDS][TITLE]"));
        let v: Value = serde_json::json!({"data": {"LIST": ["x", "\u{0}"]}});
        assert_eq!(nul_field(&v).as_deref(), Some("data[LIST][1]"));
        let v: Value = serde_json::json!({"data": {"a\u{0}b": "1"}});
        assert_eq!(nul_field(&v).as_deref(), Some("data[a\\0b]"));
        let v: Value = serde_json::json!({"a\u{0}": "1"});
        assert_eq!(nul_field(&v).as_deref(), Some("a\\0"));
        let long = format!("{}\u{0}", "k".repeat(100));
        let v: Value = serde_json::json!({ long: "1" });
        assert_eq!(
            nul_field(&v).unwrap().chars().count(),
            41,
            "cut to 40 and an ellipsis"
        );
        let clean: Value =
            serde_json::json!({"data": {"FIELDS": {"ID": "1"}, "L": [1, null, true]}});
        assert_eq!(nul_field(&clean), None);
    }

    #[test]
    fn only_bodies_that_may_hold_a_nul_are_walked() {
        assert!(may_hold_nul(b"a=b%00"));
        assert!(may_hold_nul(b"a=\0"));
        assert!(may_hold_nul(br#"{"a":"\u0000"}"#));
        assert!(may_hold_nul(b"a=%00b"));
        assert!(!may_hold_nul(b"a=%0"));
        assert!(!may_hold_nul(b"a=%20&b=100%"));
        assert!(may_hold_nul(br#"{"a":"\u00000"}"#));
        assert!(!may_hold_nul(br#"{"a":"\u0001"}"#));
        // What it lets through decodes to no NUL: these are the texts `%00` and `\u0000`.
        let body = b"data[X]=%2500&y=%5Cu0000";
        assert!(!may_hold_nul(body));
        let v = decode(std::str::from_utf8(body).unwrap());
        assert_eq!(nul_field(&v), None);
    }

    #[test]
    fn nul_ends_a_key_but_not_a_value() {
        assert_eq!(decode("a%00b=1"), json!({"a": "1"}));
        assert_eq!(decode("c[x%00y]=2"), json!({"c_x": "2"}));
        assert_eq!(decode("a=1%002"), json!({"a": "1\u{0}2"}));
    }

    #[test]
    fn pairs_without_equals_and_empty_pairs() {
        assert_eq!(decode("a&&b=&&c[]&"), json!({"a": "", "b": "", "c": [""]}));
    }

    #[test]
    fn empty_body_is_empty_object() {
        assert_eq!(decode(""), json!({}));
        assert_eq!(decode("&&&"), json!({}));
    }

    #[test]
    fn many_keys_keep_order_and_lookups() {
        // Past LINEAR_SCAN_MAX keys the hash index takes over; the result must not change.
        let mut body: Vec<String> = (0..100).map(|i| format!("a[{i}]={i}")).collect();
        body.extend((0..100).map(|i| format!("b[k{i}]={i}&b[k{i}]=again{i}")));
        body.push("a[50]=fifty&a[]=last".into());
        let v = decode(&body.join("&"));
        let a = v["a"].as_array().expect("a is a list");
        assert_eq!(a.len(), 101);
        assert_eq!(a[50], "fifty");
        assert_eq!(a[100], "last");
        let b = v["b"].as_object().expect("b is an object");
        assert_eq!(b.len(), 100);
        assert_eq!(b["k99"], "again99");
    }

    #[test]
    fn too_many_fields_is_refused() {
        let limits = FormLimits::default();
        let body = vec!["a=1"; 1500].join("&");
        let err = decode_err(body.as_bytes(), &limits);
        assert_eq!(
            err,
            FormError::TooManyFields {
                count: 1500,
                max: 1000
            }
        );
        assert_eq!(
            err.to_string(),
            "form has 1500 fields, at most 1000 allowed"
        );
        // Exactly the limit is fine, and empty pairs do not count.
        let body = vec!["a[]=1"; 1000].join("&&");
        let v = decode_form(body.as_bytes(), &limits).expect("1000 fields");
        assert_eq!(v["a"].as_array().map(Vec::len), Some(1000));
    }

    #[test]
    fn long_key_is_refused() {
        let key = "k".repeat(300);
        let err = decode_err(format!("{key}=1").as_bytes(), &FormLimits::default());
        assert_eq!(
            err.to_string(),
            format!(
                "form key `{}…` is 300 bytes long, at most 256 allowed",
                "k".repeat(40)
            )
        );
        // The limit is on the decoded key: 256 `%41` is 768 bytes on the wire but fine.
        let body = format!("{}=1", "%41".repeat(256));
        assert!(decode_form(body.as_bytes(), &FormLimits::default()).is_ok());
    }

    #[test]
    fn deep_key_is_refused() {
        let limits = FormLimits::default();
        let ok = format!("a{}=1", "[x]".repeat(32));
        assert!(decode_form(ok.as_bytes(), &limits).is_ok());
        let deep = format!("a{}=1", "[]".repeat(33));
        assert!(matches!(
            decode_err(deep.as_bytes(), &limits),
            FormError::TooDeep {
                depth: 33,
                max: 32,
                ..
            }
        ));
        // An unclosed group still counts, as in PHP.
        let deep = format!("a{}[x=1", "[]".repeat(32));
        assert!(matches!(
            decode_err(deep.as_bytes(), &limits),
            FormError::TooDeep { depth: 33, .. }
        ));

        let roomy = FormLimits {
            max_key_len: 1 << 20,
            ..limits
        };
        let huge = format!("a{}=1", "[b]".repeat(10_000));
        let err = decode_err(huge.as_bytes(), &roomy);
        assert_eq!(
            err.to_string(),
            "form key `a[b][b][b][b][b][b][b][b][b][b][b][b][b]…` nesting is 10000 levels deep, \
             at most 32 allowed"
        );
        // With the default key length limit the same key is refused for its length.
        assert!(matches!(
            decode_err(huge.as_bytes(), &limits),
            FormError::KeyTooLong { len: 30_001, .. }
        ));
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let limits = FormLimits::default();
        assert_eq!(
            decode_err(b"a=1&b=%FF", &limits),
            FormError::InvalidUtf8 {
                field: 2,
                part: FormPart::Value
            }
        );
        assert_eq!(
            decode_err(b"a\xC3=1", &limits),
            FormError::InvalidUtf8 {
                field: 1,
                part: FormPart::Key
            }
        );
        assert_eq!(
            decode_err(b"a=%C3", &limits).to_string(),
            "form body is not valid UTF-8 after percent-decoding (in the value of field 1)"
        );
        // Raw UTF-8 bytes are as good as percent-encoded ones.
        assert_eq!(
            decode_form("k=\u{e9}".as_bytes(), &limits),
            Ok(json!({"k": "é"}))
        );
    }

    #[test]
    fn error_messages_never_echo_values_and_stay_on_one_line() {
        let limits = FormLimits {
            max_depth: 1,
            ..FormLimits::default()
        };
        let err = decode_err(b"x%0A[a][b]=s6p6eclrvim6da22ft9ch94ekreb52lv", &limits);
        let msg = err.to_string();
        assert!(!msg.contains("s6p6"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains(r"x\n[a][b]"), "{msg}");
    }

    #[test]
    fn keys_sharing_a_hash_are_told_apart() {
        let mut arr = PhpArray::default();
        for i in 0..10 {
            arr.set(KeyRef::Str(&format!("k{i}")), Node::Str(String::new()));
        }
        let Some(index) = arr.index.as_mut() else {
            panic!("an array past LINEAR_SCAN_MAX keys should be indexed");
        };
        // As if "k7" had the same hash as "k3" and had been filed first.
        let h3 = index.hash(KeyRef::Str("k3"));
        index.slots.insert(h3, 7);
        index.add(h3, 3);
        assert!(matches!(arr.find(KeyRef::Str("k3")), Lookup::Found(3)));
        assert!(matches!(arr.find(KeyRef::Str("k9")), Lookup::Found(9)));
        assert!(matches!(
            arr.find(KeyRef::Str("k10")),
            Lookup::Missing(Some(_))
        ));
    }

    /// PHP's `urlencode`: only `A-Za-z0-9-_.` are left alone, a space is `+`.
    fn php_urlencode(s: &str) -> String {
        use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
        const SET: &percent_encoding::AsciiSet =
            &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');
        // `%20` can only come from a space: a literal `%` is itself encoded as `%25`.
        utf8_percent_encode(s, SET).to_string().replace("%20", "+")
    }

    /// PHP's `http_build_query`: `prefix%5Bkey%5D=value`, empty arrays omitted.
    fn http_build_query(prefix: &str, value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    http_build_query(&format!("{prefix}%5B{}%5D", php_urlencode(k)), v, out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    http_build_query(&format!("{prefix}%5B{i}%5D"), v, out);
                }
            }
            Value::String(s) => out.push(format!("{prefix}={}", php_urlencode(s))),
            other => unreachable!("generator makes only strings and containers: {other}"),
        }
    }

    fn is_canonical_int(s: &str) -> bool {
        s.parse::<i64>().is_ok_and(|n| n.to_string() == s)
    }

    // The round trip is exact only for keys PHP reads back unchanged:
    // - top-level names: no ' ' or '.' (mangled to '_'), no '[' (starts a group), no NUL
    //   (ends the key); those rules also rule out leading spaces (dropped);
    // - nested keys: no ']' (ends the group early), no NUL, not a lone whitespace character
    //   (`[ ]` means append), and not a canonical integer (it would become an integer key,
    //   and an object {"0": ..} would come back as a list). Non-canonical look-alikes such as
    //   "01", "-0" or " 1" are generated on purpose: they must stay strings.
    // Values are unconstrained. Containers are non-empty because http_build_query drops
    // empty ones.
    fn top_key() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_\\-\\]%+&=\u{e9}\u{4e2d}\u{1f600}]{1,8}"
    }

    fn nested_key() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9_ .\\-\\[%+&=\t\u{e9}\u{1f600}]{1,8}",
            Just("01".to_string()),
            Just("-0".to_string()),
            Just(" 1".to_string()),
            Just("+1".to_string()),
            Just("9223372036854775808".to_string()),
        ]
        .prop_filter("an integer key would come back as one", |k| {
            !is_canonical_int(k)
        })
        .prop_filter("`[ ]` means append", |k| {
            !matches!(k.as_str(), " " | "\t" | "\n" | "\x0B" | "\x0C" | "\r")
        })
    }

    fn nested_value() -> impl Strategy<Value = Value> {
        let leaf = any::<String>().prop_map(Value::String);
        leaf.prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..5).prop_map(Value::Array),
                prop::collection::btree_map(nested_key(), inner, 1..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn roundtrips_http_build_query_output(
            top in prop::collection::btree_map(top_key(), nested_value(), 0..6)
        ) {
            let expected = Value::Object(top.into_iter().collect());
            let mut pairs = Vec::new();
            if let Value::Object(map) = &expected {
                for (k, v) in map {
                    http_build_query(&php_urlencode(k), v, &mut pairs);
                }
            }
            let body = pairs.join("&");
            let limits = FormLimits { max_keys: 100_000, ..FormLimits::default() };
            prop_assert_eq!(decode_form(body.as_bytes(), &limits), Ok(expected), "{}", body);
        }

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..4096)) {
            if let Ok(v) = decode_form(&body, &FormLimits::default()) {
                prop_assert!(v.is_object());
            }
        }

        #[test]
        fn bracket_soup_never_panics(body in "[ab\\[\\] .=&%+05\t\u{e9}]{0,300}") {
            let limits = FormLimits { max_depth: 4, max_keys: 20, max_key_len: 40 };
            if let Ok(v) = decode_form(body.as_bytes(), &limits) {
                prop_assert!(v.is_object());
            }
        }
    }
}
