//! Maps configuration paths (`listeners[0].routes[2].forward.backend`) to positions in the
//! YAML text, so validation errors found after parsing still point at a line and column.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Line and column, both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

/// Positions of every mapping key and sequence item in a YAML document.
#[derive(Debug, Default)]
pub struct Locator {
    positions: HashMap<String, Position>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Recorder {
    stack: Vec<Frame>,
    positions: HashMap<String, Position>,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl Recorder {
    fn position(mark: Marker) -> Position {
        Position {
            line: mark.line(),
            column: mark.col() + 1,
        }
    }

    /// Path of a node that starts now, or `None` when the node is a mapping key.
    fn enter(&mut self, ev: &Event, mark: Marker) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    if let Event::Scalar(k, ..) = ev {
                        let p = join(path, k);
                        self.positions.entry(p).or_insert(Self::position(mark));
                        *key = Some(k.clone());
                    }
                    None
                }
                Some(k) => Some(join(path, &k)),
            },
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                self.positions
                    .entry(p.clone())
                    .or_insert(Self::position(mark));
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::MappingStart(..)
            | Event::SequenceStart(..)
            | Event::Scalar(..)
            | Event::Alias(..) => {
                let Some(path) = self.enter(&ev, mark) else {
                    return;
                };
                match ev {
                    Event::MappingStart(..) => self.stack.push(Frame::Map { path, key: None }),
                    Event::SequenceStart(..) => self.stack.push(Frame::Seq { path, next: 0 }),
                    _ => {}
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl Locator {
    /// Indexes `text`. Text that does not parse as YAML yields an empty locator; the
    /// parser's own error already carries a position.
    pub fn new(text: &str) -> Self {
        let mut rec = Recorder::default();
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut rec, false);
        Self {
            positions: rec.positions,
        }
    }

    /// The position of `path`, or of its nearest ancestor that appears in the text (a
    /// missing field is reported where its parent is).
    pub fn find(&self, path: &str) -> Position {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return Position { line: 1, column: 1 },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_items() {
        let text =
            "listeners:\n  - name: web\n    routes:\n      - forward:\n          backend: api\n";
        let l = Locator::new(text);
        assert_eq!(l.find("listeners[0].name"), Position { line: 2, column: 5 });
        assert_eq!(
            l.find("listeners[0].routes[0].forward.backend"),
            Position {
                line: 5,
                column: 11
            }
        );
        // A missing field points at its parent.
        assert_eq!(
            l.find("listeners[0].routes[0].forward.backends"),
            Position { line: 4, column: 9 }
        );
    }
}
