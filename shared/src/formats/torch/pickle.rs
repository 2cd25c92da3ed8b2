//! A Python pickle reader that never runs anything, and a writer for the few shapes scae emits.
//!
//! The reader is a stack machine over the opcodes that `pickle.dump` (protocols 2–5) and
//! `torch.save` produce for dicts, lists, tuples, numbers, strings, bytes and tensors. A
//! global (`GLOBAL` / `STACK_GLOBAL`) is only a name: it is checked against an allow-list given
//! by the caller and never imported; `REDUCE` of an allowed callable is handed to the caller's
//! [`Hooks`] (which builds tensors). Anything else — an unknown opcode, a global off the list,
//! a malformed stream, values nested too deep or references that expand too far — is an error
//! naming the byte offset.

use std::collections::HashMap;
use std::sync::Arc;

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Arc<Vec<u8>>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Key/value pairs in insertion order (`dict` and `collections.OrderedDict`).
    Dict(Vec<(Value, Value)>),
    /// An allowed global, not yet called.
    Global(String, String),
    /// What the hooks made of a `BINPERSID` (torch: a storage reference).
    PersId(Box<Value>),
    /// A tensor built by the hooks.
    Tensor(Arc<super::TorchTensor>),
}

/// A torch storage: raw little-endian bytes of `dtype` elements.
#[derive(Debug, PartialEq)]
pub struct Storage {
    pub dtype: super::Dtype,
    pub bytes: Vec<u8>,
}

impl Value {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one (bools count, as in Python).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }

    /// The value under string key `key` of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(kv) => kv.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short description for error messages ("a dict", "an int", ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::Global(..) => "a class or function",
            Value::PersId(_) => "a persistent reference",
            Value::Tensor(_) => "a tensor",
        }
    }
}

/// What the caller decides while a pickle is read.
pub trait Hooks {
    /// Whether global `module.name` may appear.
    fn allowed(&self, module: &str, name: &str) -> bool;
    /// Resolve the argument of `BINPERSID` (torch: a storage reference).
    fn persistent_load(&mut self, pid: Value) -> Result<Value, String>;
    /// `REDUCE` of allowed global `module.name` with `args`.
    fn reduce(&mut self, module: &str, name: &str, args: &[Value]) -> Result<Value, String>;
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() - self.pos < n {
            return Err(format!(
                "truncated pickle: {n} bytes wanted at byte {}, {} left",
                self.pos,
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as usize)
    }
    fn u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")) as usize)
    }
    fn u64(&mut self) -> Result<usize, String> {
        let v = u64::from_le_bytes(self.take(8)?.try_into().expect("8"));
        usize::try_from(v).map_err(|_| format!("length {v} at byte {} is too large", self.pos))
    }
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("truncated pickle: unterminated line")?;
        let s = String::from_utf8(rest[..n].to_vec()).map_err(|_| format!("non-UTF-8 name at byte {}", self.pos))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String, String> {
        let at = self.pos;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| format!("invalid UTF-8 string at byte {at}"))
    }
}

/// Deepest nesting of containers accepted (deeper values could exhaust the native stack when
/// dropped or compared; the reference's files nest 4 deep).
const MAX_DEPTH: u32 = 100;

/// Most values a pickle may expand to through memo references (each `BINGET` copies its value;
/// a few hundred bytes of nested references could otherwise ask for billions).
const MAX_COPIED: u64 = 1 << 22;

/// The VM's stack, each value with its nesting depth (`d`), its count of values (`n`) and the
/// memo id it was stored under, if any (`id`).
struct Stack {
    v: Vec<Value>,
    d: Vec<u32>,
    n: Vec<u64>,
    id: Vec<Option<usize>>,
}

impl Stack {
    fn push(&mut self, v: Value, d: u32) -> Result<(), String> {
        self.push_n(v, d, 1)
    }
    fn push_n(&mut self, v: Value, d: u32, n: u64) -> Result<(), String> {
        if d > MAX_DEPTH {
            return Err(format!("values nested more than {MAX_DEPTH} deep"));
        }
        self.v.push(v);
        self.d.push(d);
        self.n.push(n);
        self.id.push(None);
        Ok(())
    }
    fn pop(&mut self, at: usize) -> Result<(Value, u32), String> {
        self.n.pop();
        self.id.pop();
        match (self.v.pop(), self.d.pop()) {
            (Some(v), Some(d)) => Ok((v, d)),
            _ => Err(format!("malformed pickle: empty stack at byte {at}")),
        }
    }
    /// Everything above position `m`, the deepest of it and its count of values.
    fn split_off(&mut self, m: usize) -> (Vec<Value>, u32, u64) {
        let d = self.d.split_off(m).into_iter().max().unwrap_or(0);
        let n = self.n.split_off(m).into_iter().sum();
        self.id.truncate(m);
        (self.v.split_off(m), d, n)
    }
    fn len(&self) -> usize {
        self.v.len()
    }
}

/// Read one pickle from the start of `data`; returns the value and the bytes it used.
pub fn load(data: &[u8], hooks: &mut dyn Hooks) -> Result<(Value, usize), String> {
    let mut r = Reader { data, pos: 0 };
    let mut stack = Stack { v: Vec::new(), d: Vec::new(), n: Vec::new(), id: Vec::new() };
    let mut copied: u64 = 0;
    // Positions in `stack` where MARK was pushed.
    let mut marks: Vec<usize> = Vec::new();
    // Memo entries by id; `None` marks a container changed after it was stored (a reference
    // to it would read the stale copy, so it is refused).
    let mut memo: HashMap<usize, Option<(Value, u32, u64)>> = HashMap::new();
    fn pop_mark(stack: &mut Stack, marks: &mut Vec<usize>, at: usize) -> Result<(Vec<Value>, u32, u64), String> {
        let m = marks.pop().ok_or_else(|| format!("malformed pickle: no MARK before byte {at}"))?;
        if m > stack.len() {
            return Err(format!("malformed pickle: MARK past the stack at byte {at}"));
        }
        Ok(stack.split_off(m))
    }
    fn set_items(target: &mut Value, items: Vec<Value>, at: usize) -> Result<(), String> {
        let Value::Dict(kv) = target else {
            return Err(format!("malformed pickle: SETITEM(S) on {} at byte {at}", target.kind()));
        };
        if !items.len().is_multiple_of(2) {
            return Err(format!("malformed pickle: odd SETITEMS count at byte {at}"));
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            match kv.iter_mut().find(|(old, _)| *old == k) {
                Some(slot) => slot.1 = v,
                None => kv.push((k, v)),
            }
        }
        Ok(())
    }
    /// Add `items` (of depth `d`) into the container on top of the stack; a memo copy of it
    /// goes stale.
    fn extend_top(
        stack: &mut Stack,
        memo: &mut HashMap<usize, Option<(Value, u32, u64)>>,
        items: Vec<Value>,
        d: u32,
        n: u64,
        dict: bool,
        at: usize,
    ) -> Result<(), String> {
        if let Some(Some(id)) = stack.id.last() {
            memo.insert(*id, None);
        }
        if let Some(count) = stack.n.last_mut() {
            *count += n;
        }
        let depth = stack.d.last_mut().ok_or_else(|| format!("malformed pickle: empty stack at byte {at}"))?;
        *depth = (*depth).max(d + 1);
        if *depth > MAX_DEPTH {
            return Err(format!("values nested more than {MAX_DEPTH} deep"));
        }
        let top = stack.v.last_mut().expect("depth and value stacks agree");
        if dict {
            return set_items(top, items, at);
        }
        match top {
            Value::List(l) => Ok(l.extend(items)),
            other => Err(format!("malformed pickle: APPEND on {} at byte {at}", other.kind())),
        }
    }
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                let p = r.u8()?;
                if p > 5 {
                    return Err(format!("pickle protocol {p}: expected 2 to 5"));
                }
            }
            0x95 => {
                r.u64()?; // FRAME: a length hint only.
            }
            b'.' => {
                let (v, _) = stack.pop(at)?;
                return Ok((v, r.pos));
            }
            b'(' => marks.push(stack.len()),
            b'0' => {
                stack.pop(at)?;
            }
            b'1' => {
                pop_mark(&mut stack, &mut marks, at)?;
            }
            b'2' => {
                let n = stack.n.last().copied().unwrap_or(0);
                let (v, d) = stack.pop(at)?;
                copied += n;
                if copied > MAX_COPIED {
                    return Err(format!("references expand to more than {MAX_COPIED} values (byte {at})"));
                }
                stack.push_n(v.clone(), d, n)?;
                stack.push_n(v, d, n)?;
            }
            b'N' => stack.push(Value::None, 0)?,
            0x88 => stack.push(Value::Bool(true), 0)?,
            0x89 => stack.push(Value::Bool(false), 0)?,
            b'J' => stack.push(Value::Int(i32::from_le_bytes(r.take(4)?.try_into().expect("4")) as i64), 0)?,
            b'K' => stack.push(Value::Int(r.u8()? as i64), 0)?,
            b'M' => stack.push(Value::Int(r.u16()? as i64), 0)?,
            0x8a | 0x8b => {
                let n = if op == 0x8a { r.u8()? as usize } else { r.u32()? };
                let bytes = r.take(n)?;
                if n > 8 {
                    return Err(format!("integer of {n} bytes at byte {at} does not fit 64 bits"));
                }
                let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                buf[..n].copy_from_slice(bytes);
                stack.push(Value::Int(i64::from_le_bytes(buf)), 0)?;
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(r.take(8)?.try_into().expect("8"))), 0)?,
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => r.u32()?,
                    0x8c => r.u8()? as usize,
                    _ => r.u64()?,
                };
                stack.push(Value::Str(r.utf8(n)?), 0)?;
            }
            b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'B' => r.u32()?,
                    b'C' => r.u8()? as usize,
                    _ => r.u64()?,
                };
                stack.push(Value::Bytes(Arc::new(r.take(n)?.to_vec())), 0)?;
            }
            b')' => stack.push(Value::Tuple(vec![]), 0)?,
            b't' | b'l' => {
                let (items, d, n) = pop_mark(&mut stack, &mut marks, at)?;
                stack.push_n(if op == b't' { Value::Tuple(items) } else { Value::List(items) }, d + 1, n + 1)?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(format!("malformed pickle: TUPLE{n} on a short stack at byte {at}"));
                }
                let m = stack.len() - n;
                let (items, d, n) = stack.split_off(m);
                stack.push_n(Value::Tuple(items), d + 1, n + 1)?;
            }
            b']' => stack.push(Value::List(vec![]), 0)?,
            b'}' => stack.push(Value::Dict(vec![]), 0)?,
            b'a' => {
                let n = stack.n.last().copied().unwrap_or(0);
                let (v, d) = stack.pop(at)?;
                extend_top(&mut stack, &mut memo, vec![v], d, n, false, at)?;
            }
            b'e' | b'u' => {
                let (items, d, n) = pop_mark(&mut stack, &mut marks, at)?;
                extend_top(&mut stack, &mut memo, items, d, n, op == b'u', at)?;
            }
            b'd' => {
                let (items, d, n) = pop_mark(&mut stack, &mut marks, at)?;
                let mut dict = Value::Dict(vec![]);
                set_items(&mut dict, items, at)?;
                stack.push_n(dict, d + 1, n + 1)?;
            }
            b's' => {
                if stack.len() < 2 {
                    return Err(format!("malformed pickle: SETITEM on a short stack at byte {at}"));
                }
                let n = stack.n[stack.len() - 2..].iter().sum();
                let (v, dv) = stack.pop(at)?;
                let (k, dk) = stack.pop(at)?;
                extend_top(&mut stack, &mut memo, vec![k, v], dv.max(dk), n, true, at)?;
            }
            b'c' | 0x93 => {
                let (module, name) = if op == b'c' {
                    (r.line()?, r.line()?)
                } else {
                    let (name, _) = stack.pop(at)?;
                    let (module, _) = stack.pop(at)?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => (m, n),
                        _ => return Err(format!("malformed pickle: STACK_GLOBAL without two strings at byte {at}")),
                    }
                };
                if !hooks.allowed(&module, &name) {
                    return Err(format!(
                        "global `{module}.{name}` at byte {at} is not one these files use; refusing to load it (a pickle can run code)"
                    ));
                }
                stack.push(Value::Global(module, name), 0)?;
            }
            b'R' | 0x81 => {
                let n = stack.n.last().copied().unwrap_or(1);
                let (args, d) = stack.pop(at)?;
                let (func, _) = stack.pop(at)?;
                let Value::Global(module, name) = func else {
                    return Err(format!("malformed pickle: REDUCE of {} at byte {at}", func.kind()));
                };
                let Value::Tuple(args) = args else {
                    return Err(format!("malformed pickle: REDUCE with {} as arguments at byte {at}", args.kind()));
                };
                let v = hooks.reduce(&module, &name, &args).map_err(|e| format!("{e} (byte {at})"))?;
                stack.push_n(v, d, n)?;
            }
            b'b' => {
                // BUILD: set an object's state. Dicts (an OrderedDict's `_metadata`) keep their
                // items; the state is dropped.
                stack.pop(at)?;
                if stack.len() == 0 {
                    return Err(format!("malformed pickle: BUILD on empty stack at byte {at}"));
                }
            }
            b'Q' => {
                let (pid, d) = stack.pop(at)?;
                stack.push(hooks.persistent_load(pid).map_err(|e| format!("{e} (byte {at})"))?, d)?;
            }
            b'q' | b'r' | 0x94 => {
                let (v, d, n) = match (stack.v.last(), stack.d.last(), stack.n.last()) {
                    (Some(v), Some(d), Some(n)) => (v.clone(), *d, *n),
                    _ => return Err(format!("malformed pickle: PUT on empty stack at byte {at}")),
                };
                let id = match op {
                    b'q' => r.u8()? as usize,
                    b'r' => r.u32()?,
                    _ => memo.len(),
                };
                // Storing copies the value.
                copied += n;
                if copied > MAX_COPIED {
                    return Err(format!("references expand to more than {MAX_COPIED} values (byte {at})"));
                }
                memo.insert(id, Some((v, d, n)));
                if let Some(slot) = stack.id.last_mut() {
                    *slot = Some(id);
                }
            }
            b'h' | b'j' => {
                let id = if op == b'h' { r.u8()? as usize } else { r.u32()? };
                let (v, d, n) = match memo.get(&id) {
                    Some(Some(e)) => e,
                    Some(None) => {
                        return Err(format!(
                            "memo entry {id} at byte {at} is a container changed after it was stored (shared mutable objects are not supported)"
                        ))
                    }
                    None => return Err(format!("malformed pickle: memo entry {id} missing at byte {at}")),
                };
                copied += n;
                if copied > MAX_COPIED {
                    return Err(format!("references expand to more than {MAX_COPIED} values (byte {at})"));
                }
                stack.push_n(v.clone(), *d, *n)?;
            }
            _ => return Err(format!("unexpected pickle opcode 0x{op:02x} at byte {at}")),
        }
    }
}

/// A protocol-2 pickle writer for dicts, strings, ints, tuples, tensors' reduce calls and
/// persistent ids (what `torch.load` reads back).
pub struct Writer {
    pub out: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer { out: vec![0x80, 2] }
    }
    pub fn op(&mut self, op: u8) -> &mut Self {
        self.out.push(op);
        self
    }
    pub fn mark(&mut self) -> &mut Self {
        self.op(b'(')
    }
    pub fn none(&mut self) -> &mut Self {
        self.op(b'N')
    }
    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.op(if b { 0x88 } else { 0x89 })
    }
    pub fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.out.extend([b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend((v as u16).to_le_bytes());
        } else if let Ok(v) = i32::try_from(v) {
            self.out.push(b'J');
            self.out.extend(v.to_le_bytes());
        } else {
            self.out.extend([0x8a, 8]);
            self.out.extend(v.to_le_bytes());
        }
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
        self
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.out.push(b'c');
        for part in [module, name] {
            self.out.extend(part.as_bytes());
            self.out.push(b'\n');
        }
        self
    }
    /// A tuple of ints.
    pub fn int_tuple(&mut self, v: &[usize]) -> &mut Self {
        self.mark();
        for &x in v {
            self.int(x as i64);
        }
        self.op(b't')
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }
}

#[cfg(test)]
mod tests;
