//! Tests of the pickle reader and writer.

use super::*;

struct Plain;
impl Hooks for Plain {
    fn allowed(&self, module: &str, name: &str) -> bool {
        (module, name) == ("collections", "OrderedDict")
    }
    fn persistent_load(&mut self, pid: Value) -> Result<Value, String> {
        Ok(Value::PersId(Box::new(pid)))
    }
    fn reduce(&mut self, _: &str, _: &str, _: &[Value]) -> Result<Value, String> {
        Ok(Value::Dict(vec![]))
    }
}

#[test]
fn writer_output_reads_back() {
    let mut w = Writer::new();
    w.global("collections", "OrderedDict").op(b')').op(b'R').mark();
    w.str("a").int(3).str("b").int(-70000).str("c").int(1 << 40).str("d").none().str("e").int_tuple(&[2, 300]);
    w.op(b'u');
    let bytes = w.finish();
    let (v, used) = load(&bytes, &mut Plain).unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(v.get("a"), Some(&Value::Int(3)));
    assert_eq!(v.get("b"), Some(&Value::Int(-70000)));
    assert_eq!(v.get("c"), Some(&Value::Int(1 << 40)));
    assert_eq!(v.get("d"), Some(&Value::None));
    assert_eq!(v.get("e"), Some(&Value::Tuple(vec![Value::Int(2), Value::Int(300)])));
}

#[test]
fn refuses_unknown_globals_opcodes_and_truncation() {
    let evil = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00lsR.";
    let e = load(evil, &mut Plain).unwrap_err();
    assert!(e.contains("global `posix.system`") && e.contains("refusing"), "{e}");
    let e = load(b"\x80\x02I1\n.", &mut Plain).unwrap_err();
    assert!(e.contains("opcode 0x49"), "{e}");
    let e = load(b"\x80\x02X\x09\x00\x00\x00abc", &mut Plain).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    let e = load(b"\x80\x02.", &mut Plain).unwrap_err();
    assert!(e.contains("empty stack"), "{e}");
    // A list nested a million deep is refused before it is built.
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 1_000_000));
    deep.extend(std::iter::repeat_n(b'a', 999_999));
    deep.push(b'.');
    let e = load(&deep, &mut Plain).unwrap_err();
    assert!(e.contains("nested more than 100 deep"), "{e}");
    // A list of 10 copies of a list of 10 copies of ... (10^20 values) is refused.
    let mut bomb = vec![0x80, 2, b']', b'K', 0, b'a', b'q', 0];
    for _ in 0..20 {
        bomb.extend([b'(']);
        bomb.extend(std::iter::repeat_n([b'h', 0], 10).flatten());
        bomb.extend([b'l', b'q', 0]);
    }
    bomb.push(b'.');
    let e = load(&bomb, &mut Plain).unwrap_err();
    assert!(e.contains("expand to more than"), "{e}");
    // x = [1]; {'a': x, 'b': x}: the list was stored empty, then filled; its reference is refused.
    let shared = b"\x80\x02}(X\x01\x00\x00\x00a]q\x00K\x01aX\x01\x00\x00\x00bh\x00u.";
    let e = load(shared, &mut Plain).unwrap_err();
    assert!(e.contains("changed after it was stored"), "{e}");
    // A huge explicit memo index costs nothing.
    let (v, _) = load(b"\x80\x02Nr\xff\xff\xff\x00.", &mut Plain).unwrap();
    assert_eq!(v, Value::None);
}

#[test]
fn reads_protocol_4_with_memoize_and_long_ints() {
    // pickle.dumps({'x': [1, -2, 2**40], 'y': b'ab'}, protocol=4) by hand.
    let mut p = vec![0x80, 4, 0x95];
    p.extend(0u64.to_le_bytes());
    p.extend([b'}', 0x94, b'(', 0x8c, 1, b'x', 0x94, b']', 0x94, b'(', b'K', 1, b'J']);
    p.extend((-2i32).to_le_bytes());
    p.extend([0x8a, 6, 0, 0, 0, 0, 0, 1, b'e', 0x8c, 1, b'y', 0x94, b'C', 2, b'a', b'b', 0x94, b'u', b'.']);
    let (v, _) = load(&p, &mut Plain).unwrap();
    let x = v.get("x").unwrap().as_seq().unwrap().to_vec();
    assert_eq!(x, vec![Value::Int(1), Value::Int(-2), Value::Int(1 << 40)]);
    assert_eq!(v.get("y"), Some(&Value::Bytes(Arc::new(b"ab".to_vec()))));
}
