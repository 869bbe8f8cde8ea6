//! Builders for frontend messages stepgate sends itself (the harmless replacements of refused messages),
//! also used by the tests to speak the protocol by hand.

/// A tagged message: tag, length (counting itself), body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 5);
    v.push(tag);
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstrings(parts: &[&[u8]]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(p);
        b.push(0);
    }
    b
}

/// Query (simple protocol).
pub fn query(sql: &[u8]) -> Vec<u8> {
    message(b'Q', &cstrings(&[sql]))
}

/// Parse with no parameter types.
pub fn parse(name: &[u8], sql: &[u8]) -> Vec<u8> {
    let mut b = cstrings(&[name, sql]);
    b.extend_from_slice(&0u16.to_be_bytes());
    message(b'P', &b)
}

/// A client's Parse with its SQL replaced: `types` is the original's parameter-type section, unchanged.
pub fn parse_with_types(name: &[u8], sql: &[u8], types: &[u8]) -> Vec<u8> {
    let mut b = cstrings(&[name, sql]);
    b.extend_from_slice(types);
    message(b'P', &b)
}

/// Bind without parameters, all results in text.
pub fn bind(portal: &[u8], statement: &[u8]) -> Vec<u8> {
    let mut b = cstrings(&[portal, statement]);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    message(b'B', &b)
}

/// Execute with no row limit.
pub fn execute(portal: &[u8]) -> Vec<u8> {
    let mut b = cstrings(&[portal]);
    b.extend_from_slice(&0i32.to_be_bytes());
    message(b'E', &b)
}

pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}
