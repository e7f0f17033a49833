//! Label selectors with Calico's syntax and semantics: `all()`, `has(k)`, `k == 'v'`,
//! `k != 'v'`, `k in {'a', 'b'}`, `k not in {'a', 'b'}`, `!`, `&&`, `||` and parentheses.
//! `&&` binds tighter than `||`; `!` tighter than both. As in Calico, `k != 'v'` and
//! `k not in {…}` also match endpoints without the label `k`. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::labels::valid_key;

/// A parsed selector. Its `Display` is the canonical text: two selectors that print alike
/// select alike (the agent names a selector's address set after it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    All,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Not(Box<Selector>),
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

/// Why a selector does not parse, with the character offset where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} at offset {offset}")]
pub struct SelectorError {
    pub offset: usize,
    pub reason: String,
}

/// Longest selector text accepted (a selector is evaluated for every endpoint of the fabric).
pub const MAX_SELECTOR_LEN: usize = 4096;
/// Deepest nesting of parentheses and `!` accepted (the parser recurses).
const MAX_DEPTH: usize = 64;

impl Selector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        if text.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError {
                offset: MAX_SELECTOR_LEN,
                reason: format!("longer than {MAX_SELECTOR_LEN} characters"),
            });
        }
        let mut parser = Parser {
            chars: text.char_indices().collect(),
            pos: 0,
            depth: 0,
            len: text.len(),
        };
        let selector = parser.or()?;
        parser.skip_space();
        match parser.peek() {
            None => Ok(selector),
            Some(c) => Err(parser.error(format!("unexpected {c:?}"))),
        }
    }

    /// Whether an endpoint with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All => true,
            Selector::Has(k) => labels.contains_key(k),
            Selector::Eq(k, v) => labels.get(k) == Some(v),
            Selector::Ne(k, v) => labels.get(k) != Some(v),
            Selector::In(k, set) => labels.get(k).is_some_and(|v| set.contains(v)),
            Selector::NotIn(k, set) => labels.get(k).is_none_or(|v| !set.contains(v)),
            Selector::Not(s) => !s.matches(labels),
            Selector::And(a, b) => a.matches(labels) && b.matches(labels),
            Selector::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }
}

fn quote(value: &str) -> String {
    match value.contains('\'') {
        true => format!("\"{value}\""),
        false => format!("'{value}'"),
    }
}

fn set_text(set: &BTreeSet<String>) -> String {
    let items: Vec<String> = set.iter().map(|v| quote(v)).collect();
    format!("{{{}}}", items.join(", "))
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => write!(f, "all()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == {}", quote(v)),
            Selector::Ne(k, v) => write!(f, "{k} != {}", quote(v)),
            Selector::In(k, set) => write!(f, "{k} in {}", set_text(set)),
            Selector::NotIn(k, set) => write!(f, "{k} not in {}", set_text(set)),
            Selector::Not(s) => write!(f, "!({s})"),
            Selector::And(a, b) => write!(f, "({a} && {b})"),
            Selector::Or(a, b) => write!(f, "({a} || {b})"),
        }
    }
}

struct Parser {
    chars: Vec<(usize, char)>,
    pos: usize,
    depth: usize,
    len: usize,
}

impl Parser {
    fn offset(&self) -> usize {
        self.chars.get(self.pos).map_or(self.len, |(i, _)| *i)
    }

    fn error(&self, reason: impl Into<String>) -> SelectorError {
        SelectorError {
            offset: self.offset(),
            reason: reason.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).map(|(_, c)| *c)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// Consumes `token` (after spaces) if it comes next.
    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        let n = token.chars().count();
        let next: String = self.chars[self.pos..]
            .iter()
            .take(n)
            .map(|(_, c)| *c)
            .collect();
        if next == token {
            self.pos += n;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), SelectorError> {
        match self.eat(token) {
            true => Ok(()),
            false => Err(self.error(format!("expected {token:?}"))),
        }
    }

    fn deeper(&mut self) -> Result<(), SelectorError> {
        self.depth += 1;
        match self.depth > MAX_DEPTH {
            true => Err(self.error(format!("nested deeper than {MAX_DEPTH}"))),
            false => Ok(()),
        }
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Selector::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            left = Selector::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        self.skip_space();
        // `!=` never starts an expression, so a leading `!` is always a negation.
        if self.eat("!") {
            self.deeper()?;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Selector::Not(Box::new(inner)));
        }
        if self.eat("(") {
            self.deeper()?;
            let inner = self.or()?;
            self.expect(")")?;
            self.depth -= 1;
            return Ok(inner);
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Selector, SelectorError> {
        let start = self.pos;
        let word = self.key()?;
        if word == "all" && self.eat("(") {
            self.expect(")")?;
            return Ok(Selector::All);
        }
        if word == "has" && self.eat("(") {
            let key = self.key()?;
            self.expect(")")?;
            return Ok(Selector::Has(key));
        }
        if word.is_empty() {
            self.pos = start;
            return Err(match self.peek() {
                None => self.error("expected a label key, all() or has(), found the end"),
                Some(c) => self.error(format!("expected a label key, found {c:?}")),
            });
        }
        if !valid_key(&word) {
            self.pos = start;
            return Err(self.error(format!("{word:?} is not a label key")));
        }
        if self.eat("==") {
            Ok(Selector::Eq(word, self.value()?))
        } else if self.eat("!=") {
            Ok(Selector::Ne(word, self.value()?))
        } else if self.eat_word("in") {
            Ok(Selector::In(word, self.set()?))
        } else if self.eat_word("not") {
            if !self.eat_word("in") {
                return Err(self.error("expected \"in\" after \"not\""));
            }
            Ok(Selector::NotIn(word, self.set()?))
        } else {
            Err(self.error(format!(
                "expected ==, !=, in or not in after the label key {word:?}"
            )))
        }
    }

    /// Consumes a keyword that must not run on into a key character.
    fn eat_word(&mut self, word: &str) -> bool {
        let save = self.pos;
        if self.eat(word) && !self.peek().is_some_and(key_char) {
            return true;
        }
        self.pos = save;
        false
    }

    /// A run of label-key characters (possibly empty).
    fn key(&mut self) -> Result<String, SelectorError> {
        self.skip_space();
        let mut key = String::new();
        while let Some(c) = self.peek().filter(|c| key_char(*c)) {
            key.push(c);
            self.pos += 1;
        }
        Ok(key)
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        self.skip_space();
        let quote = match self.peek() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(self.error("expected a quoted value")),
        };
        self.pos += 1;
        let mut value = String::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated value")),
                Some(c) if c == quote => {
                    self.pos += 1;
                    return Ok(value);
                }
                Some(c) => {
                    value.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        self.expect("{")?;
        let mut set = BTreeSet::new();
        if self.eat("}") {
            return Ok(set);
        }
        loop {
            set.insert(self.value()?);
            if self.eat("}") {
                return Ok(set);
            }
            self.expect(",")?;
        }
    }
}

fn key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(text: &str) -> Selector {
        Selector::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn every_operator_evaluates_as_calico_does() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let none = labels(&[]);
        let cases: &[(&str, [bool; 3])] = &[
            ("all()", [true, true, true]),
            ("has(tier)", [true, false, false]),
            ("!has(tier)", [false, true, true]),
            ("app == 'web'", [true, false, false]),
            ("app != 'web'", [false, true, true]),
            ("app in {'web', 'db'}", [true, true, false]),
            ("app not in {'web'}", [false, true, true]),
            ("app in {}", [false, false, false]),
            ("!(app == 'web')", [false, true, true]),
            ("app == 'web' && tier == 'front'", [true, false, false]),
            ("app == 'db' || has(tier)", [true, true, false]),
            (
                "app == 'db' || app == 'web' && tier == 'x'",
                [false, true, false],
            ),
            (
                "(app == 'db' || app == 'web') && !has(tier)",
                [false, true, false],
            ),
            ("!!has(app)", [true, true, false]),
            ("app==\"web\"&&tier=='front'", [true, false, false]),
        ];
        for (text, expected) in cases {
            let s = sel(text);
            let got = [s.matches(&web), s.matches(&db), s.matches(&none)];
            assert_eq!(&got, expected, "{text}");
            // The canonical text parses back to the same selector.
            assert_eq!(sel(&s.to_string()), s, "{text} -> {s}");
        }
    }

    #[test]
    fn keys_may_hold_dots_slashes_and_dashes() {
        let s = sel("k8s.io/app-name == 'x' && has(a_b)");
        assert!(s.matches(&labels(&[("k8s.io/app-name", "x"), ("a_b", "")])));
    }

    #[test]
    fn bad_syntax_is_refused_with_where() {
        for (text, offset) in [
            ("", 0),
            ("app ==", 6),
            ("app == web", 7),
            ("app = 'web'", 4),
            ("app == 'web' &&", 15),
            ("(app == 'web'", 13),
            ("app in {'a' 'b'}", 12),
            ("app == 'web')", 12),
            ("has(app", 7),
            ("app not {'a'}", 7),
            ("app == 'unterminated", 20),
            ("all", 3),
            ("a$b == 'x'", 1),
        ] {
            let err = Selector::parse(text).expect_err(text);
            assert_eq!(err.offset, offset, "{text:?}: {err}");
        }
        assert!(Selector::parse(&"(".repeat(100)).is_err());
        assert!(Selector::parse(&"!".repeat(100)).is_err());
        assert!(Selector::parse(&"x".repeat(MAX_SELECTOR_LEN + 1)).is_err());
        assert!(Selector::parse(&format!("{} == 'v'", "k".repeat(64))).is_err());
    }
}
