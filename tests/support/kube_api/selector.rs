//! Label and field selectors with the grammar of apimachinery's `labels.Parse` and
//! `fields.ParseSelector`: a syntax error is a 400 there, so it is one here too, instead of
//! a selector that quietly matches everything.

use std::collections::BTreeMap;

use super::meta::{label_value, qualified_name};

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Exists,
    DoesNotExist,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut p = Lexer {
            s: text.as_bytes(),
            i: 0,
        };
        let mut reqs = Vec::new();
        p.skip_ws();
        if p.at_end() {
            return Ok(Self(reqs));
        }
        loop {
            reqs.push(p.requirement()?);
            p.skip_ws();
            if p.at_end() {
                break;
            }
            if !p.eat(b",") {
                return Err(format!(
                    "unable to parse requirement: found '{}', expected: ','",
                    p.rest()
                ));
            }
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| {
            let v = labels.get(&r.key);
            match &r.op {
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
                Op::Equals(want) => v == Some(want),
                // As in Kubernetes: an object without the label matches `!=` and `notin`.
                Op::NotEquals(no) => v != Some(no),
                Op::In(set) => v.is_some_and(|v| set.contains(v)),
                Op::NotIn(set) => v.is_none_or(|v| !set.contains(v)),
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn rest(&self) -> String {
        String::from_utf8_lossy(&self.s[self.i..]).into_owned()
    }

    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, tok: &[u8]) -> bool {
        self.skip_ws();
        if self.s[self.i..].starts_with(tok) {
            self.i += tok.len();
            true
        } else {
            false
        }
    }

    /// A key or value: everything up to whitespace or one of the operator characters.
    fn word(&mut self) -> String {
        self.skip_ws();
        let start = self.i;
        while self.i < self.s.len()
            && !self.s[self.i].is_ascii_whitespace()
            && !b"!=<>,()".contains(&self.s[self.i])
        {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    fn key(&mut self) -> Result<String, String> {
        let k = self.word();
        if k.is_empty() {
            return Err(format!(
                "unable to parse requirement: found '{}', expected: identifier",
                self.rest()
            ));
        }
        if let Some(m) = qualified_name(&k).first() {
            return Err(format!(
                "unable to parse requirement: key: Invalid value: {k:?}: {m}"
            ));
        }
        Ok(k)
    }

    fn value(&mut self) -> Result<String, String> {
        let v = self.word();
        if let Some(m) = label_value(&v).first() {
            return Err(format!(
                "unable to parse requirement: values[0][{v}]: Invalid value: {v:?}: {m}"
            ));
        }
        Ok(v)
    }

    fn set(&mut self) -> Result<Vec<String>, String> {
        if !self.eat(b"(") {
            return Err("unable to parse requirement: expected '(' after 'in'/'notin'".into());
        }
        let mut vals = Vec::new();
        loop {
            vals.push(self.value()?);
            if self.eat(b")") {
                break;
            }
            if !self.eat(b",") {
                return Err(
                    "unable to parse requirement: expected ',' or ')' in a value set".into(),
                );
            }
        }
        if vals.iter().all(String::is_empty) && vals.len() == 1 {
            return Err("unable to parse requirement: for 'in', 'notin' operators, values set can't be empty".into());
        }
        Ok(vals)
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        if self.eat(b"!") {
            let key = self.key()?;
            return Ok(Requirement {
                key,
                op: Op::DoesNotExist,
            });
        }
        let key = self.key()?;
        let before = self.i;
        self.skip_ws();
        let op = if self.at_end() || self.s[self.i] == b',' {
            Op::Exists
        } else if self.eat(b"==") || self.eat(b"=") {
            Op::Equals(self.value()?)
        } else if self.eat(b"!=") {
            Op::NotEquals(self.value()?)
        } else if self.eat(b">") || self.eat(b"<") {
            let gt = self.s[self.i - 1] == b'>';
            let v = self.word();
            let n: i64 = v.parse().map_err(|_| {
                format!("unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer: {v}")
            })?;
            if gt {
                Op::Gt(n)
            } else {
                Op::Lt(n)
            }
        } else {
            match self.word().as_str() {
                "in" => Op::In(self.set()?),
                "notin" => Op::NotIn(self.set()?),
                other => {
                    self.i = before;
                    return Err(format!(
                        "unable to parse requirement: found '{other}', expected: in, notin, =, ==, !=, gt, lt"
                    ));
                }
            }
        };
        Ok(Requirement { key, op })
    }
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, comma-separated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self(out));
        }
        for part in text.split(',') {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                ));
            };
            out.push((field.trim().to_owned(), eq, value.trim().to_owned()));
        }
        Ok(Self(out))
    }

    /// The fields the selector names, to check that the resource supports each.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(f, _, _)| f.as_str())
    }

    /// `get` gives a field's value; an unsupported field was refused before this runs.
    pub fn matches(&self, get: impl Fn(&str) -> String) -> bool {
        self.0.iter().all(|(f, eq, v)| (get(f) == *v) == *eq)
    }
}
