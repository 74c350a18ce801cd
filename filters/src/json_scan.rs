//! A small JSON structure scanner for hot paths that need a few members of a large object.
//!
//! It walks objects and arrays without building anything: string contents are jumped over
//! 16 bytes at a time, nested values by counting brackets. It checks structure only as far as
//! it needs to find its way, so callers treat every `None` as "not sure" and fall back to a
//! full parser; a value handed to a caller is exactly the bytes a full parser would have seen
//! for it.

/// Index of the first byte at or after `i` that is not JSON whitespace.
fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = buf.get(i) {
        i += 1;
    }
    i
}

/// End (exclusive) of the string whose opening quote is at `start`.
fn skip_string(buf: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let at = find(buf, i, Class::QuoteOrEscape)?;
        if buf[at] == b'"' {
            return Some(at + 1);
        }
        // A backslash escapes exactly the next byte for the purpose of finding the end.
        i = at + 2;
    }
}

/// End (exclusive) of the object or array opening at `start`.
fn skip_container(buf: &[u8], start: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    let (i, depth, in_string) = match sse2::skip_container(buf, start) {
        Ok(end) => return Some(end),
        Err(resume) => resume,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (i, depth, in_string) = (start, 0, false);
    // `in_string` is only ever true past the opening bracket, so `i - 1` is inside `buf`, and
    // the byte before `i` is no escape (the vector walk stops at a block with one).
    let i = if in_string {
        skip_string(buf, i - 1)?
    } else {
        i
    };
    skip_container_from(buf, i, depth)
}

/// [`skip_container`] byte-wise from `i`, outside any string, `depth` brackets deep.
fn skip_container_from(buf: &[u8], mut i: usize, mut depth: usize) -> Option<usize> {
    loop {
        i = find(buf, i, Class::Structural)?;
        match buf[i] {
            b'"' => {
                i = skip_string(buf, i)?;
                continue;
            }
            b'{' | b'[' => depth += 1,
            _ => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
        }
        i += 1;
    }
}

/// What a search looks for.
#[derive(Clone, Copy)]
enum Class {
    /// `"` or `\`: the end of a string or an escape in it.
    QuoteOrEscape,
    /// `"` or a bracket: what matters inside a container being skipped.
    Structural,
    /// `,`, `}`, `]` or a byte below `!` (whitespace and control bytes) or from 0x80: the end
    /// of a literal or a number as far as the scanner is concerned. A byte that is neither
    /// valid there nor a delimiter ends it too; the caller then finds no delimiter and gives up.
    ScalarEnd,
}

impl Class {
    /// The byte-wise test, the same set of bytes as `sse2::mask`. `[` and `]` differ from `{`
    /// and `}` only in bit 0x20, so setting it folds them together.
    #[inline(always)]
    fn matches(self, b: u8) -> bool {
        match self {
            Class::QuoteOrEscape => b == b'"' || b == b'\\',
            Class::Structural => b == b'"' || matches!(b | 0x20, b'{' | b'}'),
            Class::ScalarEnd => b == b',' || b | 0x20 == b'}' || (b as i8) < b'!' as i8,
        }
    }
}

/// Index of the first byte of `class` at or after `i`.
///
/// This search runs on every string, bracket and literal. Most are a few bytes long, where a
/// byte loop's exit is mispredicted and a `memchr` call's set-up costs more than it saves: on
/// x86_64 it tests 16 bytes at once with SSE2 (part of the architecture), so the common case is
/// one load, two or three compares and a trailing-zeros count. What is left (under 16 bytes,
/// or everything on other architectures) is tested byte by byte.
#[inline(always)]
fn find(buf: &[u8], i: usize, class: Class) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    let i = match sse2::find(buf, i, class) {
        Ok(at) => return Some(at),
        Err(rest) => rest,
    };
    Some(i + buf.get(i..)?.iter().position(|&b| class.matches(b))?)
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use super::Class;
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };

    /// Searches `buf` from `i` in whole 16-byte blocks for a byte of `class`: its index, or
    /// where the last, shorter piece begins when none is found before it (the caller searches
    /// that piece).
    #[inline(always)]
    pub(super) fn find(buf: &[u8], mut i: usize, class: Class) -> Result<usize, usize> {
        while i + 16 <= buf.len() {
            // SAFETY: `i + 16 <= buf.len()`, so the unaligned load reads inside `buf`; SSE2
            // is part of every x86_64 target.
            let block = unsafe { _mm_loadu_si128(buf.as_ptr().add(i).cast()) };
            let mask = mask(block, class);
            if mask != 0 {
                return Ok(i + mask.trailing_zeros() as usize);
            }
            i += 16;
        }
        Err(i)
    }

    /// The lanes of `v` holding a byte of `class` ([`Class::matches`] on 16 bytes), as a bit
    /// mask. The compare with `!` is signed, so bytes from 0x80 count as below it.
    #[inline(always)]
    pub(super) fn mask(v: __m128i, class: Class) -> i32 {
        // SAFETY: SSE2 is part of every x86_64 target.
        unsafe {
            let eq = |b: u8| _mm_cmpeq_epi8(v, _mm_set1_epi8(b as i8));
            let folded = _mm_or_si128(v, _mm_set1_epi8(0x20));
            let folded_eq = |b: u8| _mm_cmpeq_epi8(folded, _mm_set1_epi8(b as i8));
            let lanes = match class {
                Class::QuoteOrEscape => _mm_or_si128(eq(b'"'), eq(b'\\')),
                Class::Structural => {
                    _mm_or_si128(eq(b'"'), _mm_or_si128(folded_eq(b'{'), folded_eq(b'}')))
                }
                Class::ScalarEnd => _mm_or_si128(
                    eq(b','),
                    _mm_or_si128(
                        folded_eq(b'}'),
                        _mm_cmplt_epi8(v, _mm_set1_epi8(b'!' as i8)),
                    ),
                ),
            };
            _mm_movemask_epi8(lanes)
        }
    }

    /// [`super::skip_container`] 16 bytes at a time: the quotes of a block give, by a prefix
    /// XOR, which of its bytes lie inside strings, so only the brackets outside them are
    /// looked at one by one, and a block without a closing one not even that. The end when
    /// found; else where to go on byte-wise (at a block with a backslash, or before the last
    /// 16 bytes of `buf`): the index, the depth and whether that index lies inside a string.
    pub(super) fn skip_container(buf: &[u8], start: usize) -> Result<usize, (usize, usize, bool)> {
        let mut depth = 0usize;
        // Whether the block starts inside a string, as all 16 bits or none.
        let mut inside = 0u32;
        let mut i = start;
        while i + 16 <= buf.len() {
            // SAFETY: `i + 16 <= buf.len()`, so the unaligned load reads inside `buf`; SSE2
            // is part of every x86_64 target.
            let (quotes, escapes, opens, closes) = unsafe {
                let v = _mm_loadu_si128(buf.as_ptr().add(i).cast());
                let folded = _mm_or_si128(v, _mm_set1_epi8(0x20));
                let mask = |m| _mm_movemask_epi8(m) as u32;
                (
                    mask(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8))),
                    mask(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8))),
                    mask(_mm_cmpeq_epi8(folded, _mm_set1_epi8(b'{' as i8))),
                    mask(_mm_cmpeq_epi8(folded, _mm_set1_epi8(b'}' as i8))),
                )
            };
            if escapes != 0 {
                return Err((i, depth, inside != 0));
            }
            // Bit k: the bytes up to k hold an odd number of quotes (flipped when the block
            // starts inside a string), i.e. byte k is inside a string or its opening quote.
            let mut in_string = quotes;
            in_string ^= in_string << 1;
            in_string ^= in_string << 2;
            in_string ^= in_string << 4;
            in_string ^= in_string << 8;
            in_string = (in_string ^ inside) & 0xFFFF;
            inside = if in_string & 0x8000 != 0 { 0xFFFF } else { 0 };
            let opens = opens & !in_string;
            let closes = closes & !in_string;
            if closes == 0 {
                depth += opens.count_ones() as usize;
            } else {
                let mut brackets = opens | closes;
                while brackets != 0 {
                    let bit = brackets.trailing_zeros();
                    if opens & (1 << bit) != 0 {
                        depth += 1;
                    } else {
                        // The walk starts at the opening bracket, so a closing one always
                        // finds `depth >= 1` and returns on reaching zero.
                        depth -= 1;
                        if depth == 0 {
                            return Ok(i + bit as usize + 1);
                        }
                    }
                    brackets &= brackets - 1;
                }
            }
            i += 16;
        }
        Err((i, depth, inside != 0))
    }
}

/// End (exclusive) of the value starting at `start` (no leading whitespace).
fn skip_value(buf: &[u8], start: usize) -> Option<usize> {
    match *buf.get(start)? {
        b'"' => skip_string(buf, start),
        b'{' | b'[' => skip_container(buf, start),
        b',' | b':' | b'}' | b']' => None,
        _ => {
            // A literal or a number: up to the next delimiter.
            Some(find(buf, start, Class::ScalarEnd).unwrap_or(buf.len()))
        }
    }
}

/// Calls `f(key, value)` for each member of the object `buf`, in order. `key` is the raw key
/// without its quotes and `value` the raw value without surrounding whitespace. `None` when
/// the object is malformed, when a key holds an escape (callers compare keys byte-wise), or
/// when `f` returns `None`.
pub fn for_each_member<'a>(
    buf: &'a [u8],
    f: impl FnMut(&'a [u8], &'a [u8]) -> Option<()>,
) -> Option<()> {
    let i = skip_ws(buf, 0);
    if buf.get(i) != Some(&b'{') {
        return None;
    }
    let i = skip_ws(buf, i + 1);
    if buf.get(i) == Some(&b'}') {
        return Some(());
    }
    members_from(buf, i, f).map(drop)
}

/// [`for_each_member`] for the members of the outermost object from the key whose opening
/// quote is at `key_start` (found by searching) to the end of `buf`. `None` unless what follows
/// is exactly a run of members closing at the end of `buf`, whitespace aside: in a valid
/// document that proves the key a member of the outermost object, not of a nested one.
pub fn for_each_member_to_end<'a>(
    buf: &'a [u8],
    key_start: usize,
    f: impl FnMut(&'a [u8], &'a [u8]) -> Option<()>,
) -> Option<()> {
    let end = members_from(buf, key_start, f)?;
    (skip_ws(buf, end) == buf.len()).then_some(())
}

/// Whether the byte at `at` is outside any escape: not preceded by an odd run of backslashes.
pub fn unescaped(buf: &[u8], at: usize) -> bool {
    let run = buf[..at].iter().rev().take_while(|&&b| b == b'\\').count();
    run % 2 == 0
}

/// Members from the key at `i` to the object's closing brace; the index after that brace.
fn members_from<'a>(
    buf: &'a [u8],
    mut i: usize,
    mut f: impl FnMut(&'a [u8], &'a [u8]) -> Option<()>,
) -> Option<usize> {
    loop {
        if buf.get(i) != Some(&b'"') {
            return None;
        }
        // Keys must hold no escape: the first quote or backslash ends the key or refuses it.
        let key_end = find(buf, i + 1, Class::QuoteOrEscape)?;
        if buf[key_end] != b'"' {
            return None;
        }
        let key = &buf[i + 1..key_end];
        let key_end = key_end + 1;
        i = skip_ws(buf, key_end);
        if buf.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(buf, i + 1);
        let value_end = skip_value(buf, i)?;
        f(key, &buf[i..value_end])?;
        i = skip_ws(buf, value_end);
        match buf.get(i) {
            Some(b',') => i = skip_ws(buf, i + 1),
            Some(b'}') => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Calls `f(element)` for each element of the array `buf`, in order; `None` as for
/// [`for_each_member`].
pub fn for_each_element<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(&'a [u8]) -> Option<()>,
) -> Option<()> {
    let mut i = skip_ws(buf, 0);
    if buf.get(i) != Some(&b'[') {
        return None;
    }
    i = skip_ws(buf, i + 1);
    if buf.get(i) == Some(&b']') {
        return Some(());
    }
    loop {
        let end = skip_value(buf, i)?;
        f(&buf[i..end])?;
        i = skip_ws(buf, end);
        match buf.get(i) {
            Some(b',') => i = skip_ws(buf, i + 1),
            Some(b']') => return Some(()),
            _ => return None,
        }
    }
}

/// How far [`ValueEnd::scan`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scanned {
    /// The value ends just before this index of the piece scanned.
    End(usize),
    /// The piece ended inside the value: scan the next one.
    More,
    /// A closing bracket without an opening one.
    Malformed,
}

/// Finds the end of one object or array that arrives in pieces, without keeping them: the
/// state between pieces is the bracket depth and whether the last piece ended inside a string
/// or right after a backslash in one. Fed the value's bytes piece by piece from its opening
/// bracket, it reads each byte once, whatever the split.
#[derive(Debug, Default, Clone, Copy)]
pub struct ValueEnd {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl ValueEnd {
    /// Scans `piece[from..]`, the next bytes of the value.
    pub fn scan(&mut self, piece: &[u8], from: usize) -> Scanned {
        let mut i = from;
        loop {
            if self.escaped {
                if i >= piece.len() {
                    return Scanned::More;
                }
                self.escaped = false;
                i += 1;
            }
            if self.in_string {
                let Some(at) = find(piece, i, Class::QuoteOrEscape) else {
                    return Scanned::More;
                };
                if piece[at] == b'"' {
                    self.in_string = false;
                } else {
                    self.escaped = true;
                }
                i = at + 1;
                continue;
            }
            let Some(at) = find(piece, i, Class::Structural) else {
                return Scanned::More;
            };
            match piece[at] {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                _ => {
                    let Some(depth) = self.depth.checked_sub(1) else {
                        return Scanned::Malformed;
                    };
                    self.depth = depth;
                    if depth == 0 {
                        return Scanned::End(at + 1);
                    }
                }
            }
            i = at + 1;
        }
    }
}

/// A raw value read as an optional unsigned integer, as serde reads `Option<u64>`: `null` is
/// `Some(None)`; anything but plain digits that fit (a fraction, an exponent, a string) is
/// `None`, for the caller to hand to a full parser.
pub fn opt_u64(value: &[u8]) -> Option<Option<u64>> {
    if value == b"null" {
        return Some(None);
    }
    if value.is_empty() || (value.len() > 1 && value[0] == b'0') {
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members_of(buf: &[u8]) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        for_each_member(buf, |k, v| {
            out.push((
                String::from_utf8(k.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            ));
            Some(())
        })?;
        Some(out)
    }

    #[test]
    fn members_match_a_full_parser() {
        let cases: &[&str] = &[
            r#"{}"#,
            r#" { "a" : 1 , "b":"x" } "#,
            r#"{"text":"a \"quoted\" } ] { [ brace","n":-1.5e3,"t":true,"z":null}"#,
            r#"{"a":{"b":[1,{"c":"}"}],"d":"\\"},"e":[[],{}],"f":"\\\\\"x"}"#,
            r#"{"usageMetadata":"not \"usageMetadata\": {}","u":{"usageMetadata":1}}"#,
            "{\"a\":\n[1,\t2]\r\n}",
            r#"{"emoji":"✅ «é»","k":"\u00e9\ud83d\ude00"}"#,
        ];
        for case in cases {
            let scanned = members_of(case.as_bytes()).unwrap_or_else(|| panic!("{case}"));
            let parsed: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(case).unwrap();
            assert_eq!(scanned.len(), parsed.len(), "{case}");
            for (k, v) in &scanned {
                let v: serde_json::Value = serde_json::from_str(v).unwrap();
                assert_eq!(Some(&v), parsed.get(k), "{case}: {k}");
            }
        }
    }

    #[test]
    fn malformed_or_escaped_keys_are_refused() {
        for case in [
            "",
            "[]",
            r#"{"a":1"#,
            r#"{"a":"unterminated}"#,
            r#"{"a" 1}"#,
            r#"{"a":1,}"#,
            r#"{"a":1 "b":2}"#,
            r#"{"a":}"#,
            r#"{"a":{"b":1}"#,
            r#"{"a":[1,2}"#,
            r#"{"usage\u004detadata":1}"#,
            r#"{a:1}"#,
        ] {
            assert!(members_of(case.as_bytes()).is_none(), "{case}");
        }
    }

    #[test]
    fn elements_in_order() {
        let mut seen = Vec::new();
        for_each_element(br#" [ {"a":"]"} , 2,"x" ,[3]] "#, |v| {
            seen.push(String::from_utf8(v.to_vec()).unwrap());
            Some(())
        })
        .unwrap();
        assert_eq!(seen, [r#"{"a":"]"}"#, "2", r#""x""#, "[3]"]);
        assert!(for_each_element(b"[]", |_| None).is_some());
        assert!(for_each_element(b"[1,", |_| Some(())).is_none());
        assert!(for_each_element(b"[1]", |_| None).is_none());
    }

    /// Any split of a document gives the same ends as one scan of it, and as the container
    /// skip.
    #[test]
    fn value_end_is_the_same_under_any_split() {
        let doc: &[u8] =
            br#"{"a":"x\"}]\\","b":[1,{"c":"\\\"{"}],"d":{"e":"0123456789abcdef\n"}}{"n":[]}"#;
        let first = skip_container(doc, 0).unwrap();
        let ends = |pieces: &[&[u8]]| {
            let mut scan = ValueEnd::default();
            let mut offset = 0;
            for piece in pieces {
                if let Scanned::End(end) = scan.scan(piece, 0) {
                    return Some(offset + end);
                }
                offset += piece.len();
            }
            None
        };
        assert_eq!(ends(&[doc]), Some(first));
        for cut in 0..=doc.len() {
            assert_eq!(ends(&[&doc[..cut], &doc[cut..]]), Some(first), "cut {cut}");
        }
        let bytes: Vec<&[u8]> = doc.chunks(1).collect();
        assert_eq!(ends(&bytes), Some(first));
        assert_eq!(ends(&[&doc[..first - 1]]), None);
        assert_eq!(ValueEnd::default().scan(b"}", 0), Scanned::Malformed);
        // Resumed from an offset in the same piece.
        let mut scan = ValueEnd::default();
        assert_eq!(scan.scan(doc, first), Scanned::End(doc.len()));
    }

    #[test]
    fn integers_as_serde_reads_them() {
        assert_eq!(opt_u64(b"0"), Some(Some(0)));
        assert_eq!(opt_u64(b"4120"), Some(Some(4120)));
        assert_eq!(opt_u64(b"null"), Some(None));
        assert_eq!(opt_u64(b"18446744073709551615"), Some(Some(u64::MAX)));
        for refused in [
            &b"18446744073709551616"[..],
            b"",
            b"-1",
            b"1.0",
            b"1e3",
            b"\"5\"",
            b"012",
            b"true",
        ] {
            assert_eq!(opt_u64(refused), None, "{:?}", refused);
        }
    }

    #[test]
    fn members_to_end_only_for_the_outermost_object() {
        let doc = br#"{"a":{"k":1,"z":2},"k":{"n":3} , "m":"x"}  "#;
        let nested = doc.windows(3).position(|w| w == br#""k""#).unwrap();
        let outer = doc.windows(3).rposition(|w| w == br#""k""#).unwrap();
        assert!(nested < outer);
        assert!(for_each_member_to_end(doc, nested, |_, _| Some(())).is_none());
        let mut seen = Vec::new();
        for_each_member_to_end(doc, outer, |k, v| {
            seen.push((k.to_vec(), v.to_vec()));
            Some(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (b"k".to_vec(), br#"{"n":3}"#.to_vec()),
                (b"m".to_vec(), br#""x""#.to_vec())
            ]
        );
        // A nested object that happens to close last is still refused.
        let tail = br#"{"a":[{"k":1}]}"#;
        let k = tail.windows(3).position(|w| w == br#""k""#).unwrap();
        assert!(for_each_member_to_end(tail, k, |_, _| Some(())).is_none());
    }

    #[test]
    fn escapes_before_a_quote() {
        let buf = br#"a\\"b\"c\\\"d""#;
        let quotes: Vec<bool> = buf
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'"')
            .map(|(i, _)| unescaped(buf, i))
            .collect();
        assert_eq!(quotes, [true, false, false, true]);
    }

    /// The vector walk against the byte-wise one, on containers that cross 16-byte blocks at
    /// every offset, with strings holding brackets, quotes and escapes.
    #[test]
    fn container_skip_agrees_with_the_byte_walk() {
        let pieces: &[&str] = &[
            r#""a""#,
            r#""]}[{""#,
            r#""x\"y""#,
            r#""\\""#,
            r#"{"k":[1,2,{"z":"}"}]}"#,
            "[]",
            "{}",
            r#"[[["deep"]]]"#,
            r#""0123456789abcdefghij""#,
            "12345",
            "null",
        ];
        let mut state = 0x2545_f491_u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as usize
        };
        for round in 0..400 {
            let mut doc = String::from("[");
            for n in 0..(round % 9 + 1) {
                if n > 0 {
                    doc.push(',');
                }
                let piece = pieces[next() % pieces.len()];
                if next() % 3 == 0 {
                    doc.push_str(&format!(r#"{{"p{n}":{piece}}}"#));
                } else {
                    doc.push_str(piece);
                }
            }
            doc.push(']');
            let tail = " ".repeat(next() % 40);
            for pad in 0..17 {
                let text = format!("{}{doc}{tail}", " ".repeat(pad));
                let buf = text.as_bytes();
                let expected = skip_container_from(buf, pad, 0);
                assert_eq!(expected, Some(pad + doc.len()), "{text}");
                assert_eq!(skip_container(buf, pad), expected, "{text}");
            }
        }
    }
}
