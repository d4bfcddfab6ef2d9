//! MLflow's search language for runs: the `filter` and `order_by` of `POST /api/2.0/mlflow/runs/search`
//! (and `mlflow.search_runs`), parsed once into a [`Filter`] and [`Order`]s and evaluated against any run
//! that implements [`SearchableRun`]. The tracking store and the MLflow REST API (issue 6) use it; it is
//! pure, so it is tested here on its own.
//!
//! ```text
//!   filter     := clause (AND clause)*            an empty filter matches every run; AND in any case
//!   clause     := key comparator value
//!               | key [NOT] IN '(' string (',' string)* ')'
//!   key        := entity '.' name                  name: tags.mlflow.runName, or `any text`, or "any text"
//!   entity     := metrics | metric | params | param | parameters | tags | tag
//!               | attributes | attribute | attr | run
//!   comparator := = | != | <> | > | >= | < | <= | LIKE | ILIKE
//!   value      := number | 'text' | "text"
//!   order_by   := key [ASC | DESC]                  one string per key, as MLflow takes them
//! ```
//!
//! The rules follow MLflow's:
//! - metrics (a run's latest value of each) compare as numbers with `=`, `!=`, `>`, `>=`, `<`, `<=`;
//! - params and tags compare as text with `=`, `!=`, `LIKE`, `ILIKE` (`%` any run of characters, `_` one
//!   character; `ILIKE` ignores case);
//! - the text attributes `run_id`, `run_name`, `status`, `artifact_uri` and `user_id` take the text
//!   comparators and `IN` / `NOT IN`; the times `start_time` (also `created`) and `end_time`, in
//!   milliseconds since the epoch, take the numeric ones;
//! - a run without the metric, param, tag or attribute named never matches the clause, whatever the
//!   comparator (`!=` included);
//! - ordering puts runs without the key last in both directions, then breaks ties by start time (newest
//!   first) and run id, so a page boundary is stable.
//!
//! A filter that does not parse is refused with an error naming the token and what was expected there.

use std::cmp::Ordering;

/// Why a filter or an ordering was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SearchError(String);

fn error<T>(message: String) -> Result<T, SearchError> {
    Err(SearchError(message))
}

/// A run as the search sees it. The tracking store's run implements it.
pub trait SearchableRun {
    /// The latest value of metric `key`.
    fn metric(&self, key: &str) -> Option<f64>;
    fn param(&self, key: &str) -> Option<&str>;
    fn tag(&self, key: &str) -> Option<&str>;
    fn text_attribute(&self, attribute: TextAttribute) -> Option<&str>;
    /// Milliseconds since the epoch.
    fn time_attribute(&self, attribute: TimeAttribute) -> Option<i64>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextAttribute {
    RunId,
    RunName,
    Status,
    ArtifactUri,
    UserId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeAttribute {
    StartTime,
    EndTime,
}

/// What a key names.
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    Metric(String),
    Param(String),
    Tag(String),
    Text(TextAttribute),
    Time(TimeAttribute),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparator {
    Equal,
    NotEqual,
    Greater,
    GreaterOrEqual,
    Less,
    LessOrEqual,
    Like,
    ILike,
}

impl Comparator {
    fn numeric(self) -> bool {
        !matches!(self, Comparator::Like | Comparator::ILike)
    }

    fn textual(self) -> bool {
        matches!(
            self,
            Comparator::Equal | Comparator::NotEqual | Comparator::Like | Comparator::ILike
        )
    }

    fn holds(self, ordering: Ordering) -> bool {
        match self {
            Comparator::Equal => ordering == Ordering::Equal,
            Comparator::NotEqual => ordering != Ordering::Equal,
            Comparator::Greater => ordering == Ordering::Greater,
            Comparator::GreaterOrEqual => ordering != Ordering::Less,
            Comparator::Less => ordering == Ordering::Less,
            Comparator::LessOrEqual => ordering != Ordering::Greater,
            Comparator::Like | Comparator::ILike => false,
        }
    }
}

/// One clause of a filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Clause {
    Number {
        key: Key,
        comparator: Comparator,
        value: f64,
    },
    Text {
        key: Key,
        comparator: Comparator,
        value: String,
    },
    In {
        key: Key,
        values: Vec<String>,
        negated: bool,
    },
}

/// A parsed filter: every clause must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    pub clauses: Vec<Clause>,
    /// A tag that is absent satisfies `!=` (MLflow's registry rule, on which its client's
    /// `tags.mlflow.prompt.is_prompt != 'true'` relies); for runs it never matches.
    pub missing_tag_differs: bool,
}

/// One key of an ordering.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub key: Key,
    pub ascending: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// A bare word: an entity, a dotted key, or a keyword (AND, LIKE, ILIKE, IN, NOT, ASC, DESC).
    Word(String),
    /// `quoted` text: only ever a key's name.
    Backticked(String),
    /// 'quoted' or "quoted" text.
    Quoted(String),
    Number(f64),
    Comparator(Comparator),
    Open,
    Close,
    Comma,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(word) => format!("'{word}'"),
            Token::Backticked(text) => format!("`{text}`"),
            Token::Quoted(text) => format!("the string '{text}'"),
            Token::Number(number) => format!("the number {number}"),
            Token::Comparator(comparator) => format!("the comparator {comparator:?}"),
            Token::Open => "'('".into(),
            Token::Close => "')'".into(),
            Token::Comma => "','".into(),
        }
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self, Token::Word(word) if word.eq_ignore_ascii_case(keyword))
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, SearchError> {
    let characters: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < characters.len() {
        let character = characters[at];
        if character.is_whitespace() {
            at += 1;
            continue;
        }
        let start = at;
        match character {
            '(' | ')' | ',' => {
                tokens.push(match character {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    _ => Token::Comma,
                });
                at += 1;
            }
            '\'' | '"' | '`' => {
                let end = characters[at + 1..]
                    .iter()
                    .position(|other| *other == character)
                    .map(|offset| at + 1 + offset);
                let Some(end) = end else {
                    return error(format!(
                        "the quote {character} at character {start} is never closed; expected a closing {character}"
                    ));
                };
                let inner: String = characters[at + 1..end].iter().collect();
                tokens.push(if character == '`' {
                    Token::Backticked(inner)
                } else {
                    Token::Quoted(inner)
                });
                at = end + 1;
            }
            '=' | '!' | '<' | '>' => {
                let next = characters.get(at + 1).copied();
                let (comparator, length) = match (character, next) {
                    ('=', Some('=')) => (Comparator::Equal, 2),
                    ('=', _) => (Comparator::Equal, 1),
                    ('!', Some('=')) | ('<', Some('>')) => (Comparator::NotEqual, 2),
                    ('>', Some('=')) => (Comparator::GreaterOrEqual, 2),
                    ('>', _) => (Comparator::Greater, 1),
                    ('<', Some('=')) => (Comparator::LessOrEqual, 2),
                    ('<', _) => (Comparator::Less, 1),
                    _ => return error(format!("'!' at character {start} is not a comparator; expected '!='")),
                };
                tokens.push(Token::Comparator(comparator));
                at += length;
            }
            _ if character.is_ascii_digit() || character == '-' || character == '+' => {
                at += 1;
                while at < characters.len()
                    && (characters[at].is_ascii_alphanumeric()
                        || characters[at] == '.'
                        || (matches!(characters[at], '-' | '+') && matches!(characters[at - 1], 'e' | 'E')))
                {
                    at += 1;
                }
                let text: String = characters[start..at].iter().collect();
                let number = text.parse::<f64>().map_err(|_| {
                    SearchError(format!(
                        "'{text}' at character {start} is not a number; expected e.g. 0.9, -3 or 1e-4"
                    ))
                })?;
                tokens.push(Token::Number(number));
            }
            _ if character.is_alphabetic() || character == '_' => {
                while at < characters.len()
                    && (characters[at].is_alphanumeric() || matches!(characters[at], '_' | '.' | '-'))
                {
                    at += 1;
                }
                tokens.push(Token::Word(characters[start..at].iter().collect()));
            }
            other => {
                return error(format!(
                    "'{other}' at character {start} is not part of a search; expected keys, comparators, numbers and quoted strings"
                ));
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    /// What the keys name.
    subject: Subject,
}

/// What a search is over: each has its own keys, mapped onto the run keys of [`SearchableRun`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Runs,
    /// `name`, `experiment_id`, `creation_time`, `last_update_time`, `tags.KEY`.
    Experiments,
    /// `name`, `creation_timestamp`, `last_updated_timestamp`, `tags.KEY`.
    RegisteredModels,
    /// `name`, `run_id`, `source_path`, `version_number` (a number), the two timestamps, `tags.KEY`.
    ModelVersions,
    /// MLflow 3's logged models: `name`, `source_run_id`, `model_id`, `creation_timestamp`,
    /// `last_updated_timestamp`, `tags.KEY`.
    LoggedModels,
}

impl Subject {
    /// The key an attribute name stands for, if this subject has it.
    fn attribute(self, name: &str) -> Option<Key> {
        let time = |attribute| Some(Key::Time(attribute));
        match (self, name) {
            (Subject::Experiments, "name") => Some(Key::Text(TextAttribute::RunName)),
            (Subject::Experiments, "experiment_id") => Some(Key::Text(TextAttribute::RunId)),
            (Subject::Experiments, "creation_time") => time(TimeAttribute::StartTime),
            (Subject::Experiments, "last_update_time") => time(TimeAttribute::EndTime),
            (Subject::RegisteredModels | Subject::ModelVersions, "name") => Some(Key::Text(TextAttribute::RunName)),
            (Subject::RegisteredModels | Subject::ModelVersions, "creation_timestamp") => {
                time(TimeAttribute::StartTime)
            }
            (Subject::RegisteredModels | Subject::ModelVersions, "last_updated_timestamp" | "timestamp") => {
                time(TimeAttribute::EndTime)
            }
            (Subject::ModelVersions, "run_id") => Some(Key::Text(TextAttribute::RunId)),
            (Subject::ModelVersions, "source_path" | "source") => Some(Key::Text(TextAttribute::ArtifactUri)),
            (Subject::ModelVersions, "version_number") => Some(Key::Metric("version_number".into())),
            (Subject::LoggedModels, "name") => Some(Key::Text(TextAttribute::RunName)),
            (Subject::LoggedModels, "source_run_id") => Some(Key::Text(TextAttribute::RunId)),
            (Subject::LoggedModels, "model_id") => Some(Key::Text(TextAttribute::ArtifactUri)),
            (Subject::LoggedModels, "creation_timestamp" | "creation_time") => time(TimeAttribute::StartTime),
            (Subject::LoggedModels, "last_updated_timestamp") => time(TimeAttribute::EndTime),
            _ => None,
        }
    }

    fn describe(self) -> (&'static str, &'static str) {
        match self {
            Subject::Runs => ("runs", "metrics.KEY, params.KEY, tags.KEY or attributes.NAME"),
            Subject::Experiments => (
                "experiments",
                "name, experiment_id, creation_time, last_update_time or tags.KEY",
            ),
            Subject::RegisteredModels => (
                "registered models",
                "name, creation_timestamp, last_updated_timestamp or tags.KEY",
            ),
            Subject::LoggedModels => (
                "logged models",
                "name, source_run_id, model_id, creation_timestamp, last_updated_timestamp, metrics.KEY, params.KEY or tags.KEY",
            ),
            Subject::ModelVersions => (
                "model versions",
                "name, run_id, source_path, version_number, creation_timestamp, last_updated_timestamp or tags.KEY",
            ),
        }
    }
}

impl Parser {
    fn new(text: &str, subject: Subject) -> Result<Parser, SearchError> {
        Ok(Parser {
            tokens: tokenize(text)?,
            at: 0,
            subject,
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self, expected: &str) -> Result<Token, SearchError> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token.ok_or_else(|| SearchError(format!("the search ends where {expected} was expected")))
    }

    fn key(&mut self) -> Result<Key, SearchError> {
        let word = match self.next("a key such as metrics.accuracy")? {
            Token::Word(word) => word,
            other => {
                return error(format!(
                    "{} is not a key; expected a key such as metrics.accuracy, params.lr, tags.team or attributes.status",
                    other.describe()
                ));
            }
        };
        if self.subject != Subject::Runs {
            return self.subject_key(word);
        }
        let (entity, name) = match word.split_once('.') {
            Some((entity, "")) => {
                // `metrics.` followed by a quoted name.
                let name = match self.next("a quoted key name")? {
                    Token::Backticked(name) | Token::Quoted(name) => name,
                    other => return error(format!("{} is not a key name; expected `name`", other.describe())),
                };
                (entity.to_string(), name)
            }
            Some((entity, name)) => (entity.to_string(), name.to_string()),
            None => {
                return error(format!(
                    "'{word}' does not name what it is; expected metrics.{word}, params.{word}, tags.{word} or attributes.{word}"
                ));
            }
        };
        match entity.to_ascii_lowercase().as_str() {
            "metrics" | "metric" => Ok(Key::Metric(name)),
            "params" | "param" | "parameters" => Ok(Key::Param(name)),
            "tags" | "tag" => Ok(Key::Tag(name)),
            "attributes" | "attribute" | "attr" | "run" => match name.as_str() {
                "run_id" => Ok(Key::Text(TextAttribute::RunId)),
                "run_name" => Ok(Key::Text(TextAttribute::RunName)),
                "status" => Ok(Key::Text(TextAttribute::Status)),
                "artifact_uri" => Ok(Key::Text(TextAttribute::ArtifactUri)),
                "user_id" => Ok(Key::Text(TextAttribute::UserId)),
                "start_time" | "created" => Ok(Key::Time(TimeAttribute::StartTime)),
                "end_time" => Ok(Key::Time(TimeAttribute::EndTime)),
                other => error(format!(
                    "attribute '{other}' cannot be searched; expected run_id, run_name, status, artifact_uri, user_id, start_time or end_time"
                )),
            },
            other => error(format!(
                "'{other}' is not something a run has; expected metrics, params, tags or attributes before the '.'"
            )),
        }
    }

    /// A key of a search that is not over runs: an attribute (bare or after `attributes.`) of the subject,
    /// or `tags.KEY`, mapped onto the run keys its items answer.
    fn subject_key(&mut self, word: String) -> Result<Key, SearchError> {
        let (entity, name) = match word.split_once('.') {
            Some((entity, "")) => match self.next("a quoted key name")? {
                Token::Backticked(name) | Token::Quoted(name) => (entity.to_ascii_lowercase(), name),
                other => return error(format!("{} is not a key name; expected `name`", other.describe())),
            },
            Some((entity, name)) => (entity.to_ascii_lowercase(), name.to_string()),
            None => ("attributes".to_string(), word.clone()),
        };
        let (what, expected) = self.subject.describe();
        match entity.as_str() {
            "tags" | "tag" => Ok(Key::Tag(name)),
            // A logged model has params, and the metrics logged for it.
            "metrics" | "metric" if self.subject == Subject::LoggedModels => Ok(Key::Metric(name)),
            "params" | "param" if self.subject == Subject::LoggedModels => Ok(Key::Param(name)),
            "attributes" | "attribute" | "attr" => self
                .subject
                .attribute(&name)
                .ok_or_else(|| SearchError(format!("{what} cannot be searched by '{name}'; expected {expected}"))),
            other => error(format!("{what} have no '{other}'; expected {expected}")),
        }
    }

    fn clause(&mut self) -> Result<Clause, SearchError> {
        let key = self.key()?;
        let numeric_key = matches!(key, Key::Metric(_) | Key::Time(_));
        let negated = self.peek().is_some_and(|token| token.is_keyword("NOT"));
        if negated || self.peek().is_some_and(|token| token.is_keyword("IN")) {
            self.at += usize::from(negated);
            if !self.next("IN")?.is_keyword("IN") {
                return error("NOT must be followed by IN; expected NOT IN ('a', 'b')".into());
            }
            if !matches!(key, Key::Text(_)) {
                return error(format!(
                    "IN works on the text attributes (run_id, run_name, status, artifact_uri, user_id), not on {}",
                    describe_key(&key)
                ));
            }
            if self.next("'('")? != Token::Open {
                return error("IN takes a list; expected IN ('a', 'b')".into());
            }
            let mut values = Vec::new();
            loop {
                match self.next("a quoted string")? {
                    Token::Quoted(value) => values.push(value),
                    other => return error(format!("{} is not a quoted string in IN (…)", other.describe())),
                }
                match self.next("',' or ')'")? {
                    Token::Comma => continue,
                    Token::Close => break,
                    other => {
                        return error(format!(
                            "{} cannot follow a value in IN (…); expected ',' or ')'",
                            other.describe()
                        ));
                    }
                }
            }
            return Ok(Clause::In { key, values, negated });
        }
        let comparator = match self.next("a comparator")? {
            Token::Comparator(comparator) => comparator,
            token if token.is_keyword("LIKE") => Comparator::Like,
            token if token.is_keyword("ILIKE") => Comparator::ILike,
            other => {
                return error(format!(
                    "{} follows {} where a comparator was expected (=, !=, >, >=, <, <=, LIKE, ILIKE)",
                    other.describe(),
                    describe_key(&key)
                ));
            }
        };
        if numeric_key && !comparator.numeric() {
            return error(format!(
                "{} is a number; {comparator:?} compares text (expected =, !=, >, >=, <, <=)",
                describe_key(&key)
            ));
        }
        if !numeric_key && !comparator.textual() {
            return error(format!(
                "{} is text; {comparator:?} compares numbers (expected =, !=, LIKE or ILIKE)",
                describe_key(&key)
            ));
        }
        match self.next("a value")? {
            Token::Number(value) if numeric_key => Ok(Clause::Number { key, comparator, value }),
            Token::Quoted(value) if !numeric_key => Ok(Clause::Text { key, comparator, value }),
            other => error(format!(
                "{} cannot be compared with {}; expected {}",
                describe_key(&key),
                other.describe(),
                if numeric_key { "a number" } else { "a quoted string" }
            )),
        }
    }
}

fn describe_key(key: &Key) -> String {
    match key {
        Key::Metric(name) => format!("metric '{name}'"),
        Key::Param(name) => format!("param '{name}'"),
        Key::Tag(name) => format!("tag '{name}'"),
        Key::Text(attribute) => format!("attribute {attribute:?}"),
        Key::Time(attribute) => format!("attribute {attribute:?}"),
    }
}

impl Filter {
    /// Parses a filter; an empty (or blank) one matches every run.
    pub fn parse(text: &str) -> Result<Filter, SearchError> {
        Filter::parse_for(text, Subject::Runs)
    }

    /// Parses a filter of MLflow's experiment search (`name LIKE 'digits%' AND tags.team = 'vision'`),
    /// to evaluate against experiments through [`SearchableRun`] (the tracking store's `Experiment` maps its
    /// fields onto the run keys).
    pub fn parse_experiments(text: &str) -> Result<Filter, SearchError> {
        Filter::parse_for(text, Subject::Experiments)
    }

    /// Parses a filter of the search over `subject`.
    pub fn parse_for(text: &str, subject: Subject) -> Result<Filter, SearchError> {
        let mut parser = Parser::new(text, subject)?;
        let mut clauses = Vec::new();
        while parser.peek().is_some() {
            clauses.push(parser.clause()?);
            match parser.peek() {
                None => break,
                Some(token) if token.is_keyword("AND") => {
                    parser.at += 1;
                    if parser.peek().is_none() {
                        return error("the filter ends after AND; expected another clause".into());
                    }
                }
                Some(token) if token.is_keyword("OR") => {
                    return error("OR is not supported (as in MLflow); expected clauses joined by AND".into());
                }
                Some(other) => {
                    return error(format!(
                        "{} follows a complete clause; expected AND and another clause",
                        other.describe()
                    ));
                }
            }
        }
        Ok(Filter {
            clauses,
            missing_tag_differs: matches!(
                subject,
                Subject::RegisteredModels | Subject::ModelVersions | Subject::LoggedModels
            ),
        })
    }

    /// Whether `run` satisfies every clause.
    pub fn matches(&self, run: &impl SearchableRun) -> bool {
        self.clauses.iter().all(|clause| match clause {
            Clause::Text {
                key: Key::Tag(name),
                comparator: Comparator::NotEqual,
                ..
            } if self.missing_tag_differs && run.tag(name).is_none() => true,
            clause => clause_holds(clause, run),
        })
    }
}

fn text_of<'a>(key: &Key, run: &'a impl SearchableRun) -> Option<&'a str> {
    match key {
        Key::Param(name) => run.param(name),
        Key::Tag(name) => run.tag(name),
        Key::Text(attribute) => run.text_attribute(*attribute),
        Key::Metric(_) | Key::Time(_) => None,
    }
}

fn number_of(key: &Key, run: &impl SearchableRun) -> Option<f64> {
    match key {
        Key::Metric(name) => run.metric(name),
        Key::Time(attribute) => run.time_attribute(*attribute).map(|millis| millis as f64),
        _ => None,
    }
}

fn clause_holds(clause: &Clause, run: &impl SearchableRun) -> bool {
    match clause {
        Clause::Number { key, comparator, value } => number_of(key, run)
            .and_then(|found| found.partial_cmp(value))
            .is_some_and(|ordering| comparator.holds(ordering)),
        Clause::Text { key, comparator, value } => text_of(key, run).is_some_and(|found| match comparator {
            Comparator::Like => like(found, value, false),
            Comparator::ILike => like(found, value, true),
            other => other.holds(found.cmp(value.as_str())),
        }),
        Clause::In { key, values, negated } => {
            text_of(key, run).is_some_and(|found| values.iter().any(|value| value == found) != *negated)
        }
    }
}

/// SQL LIKE: `%` matches any run of characters (none included), `_` exactly one.
pub fn like(text: &str, pattern: &str, ignore_case: bool) -> bool {
    let fold = |value: &str| -> Vec<char> {
        if ignore_case {
            value.to_lowercase().chars().collect()
        } else {
            value.chars().collect()
        }
    };
    let (text, pattern) = (fold(text), fold(pattern));
    // matched[j]: the text's first i characters match the pattern's first j, row by row over i.
    let mut matched = vec![false; pattern.len() + 1];
    matched[0] = true;
    for j in 1..=pattern.len() {
        matched[j] = matched[j - 1] && pattern[j - 1] == '%';
    }
    for character in text {
        let mut next = vec![false; pattern.len() + 1];
        for j in 1..=pattern.len() {
            next[j] = match pattern[j - 1] {
                '%' => next[j - 1] || matched[j],
                '_' => matched[j - 1],
                literal => matched[j - 1] && literal == character,
            };
        }
        matched = next;
    }
    matched[pattern.len()]
}

impl Order {
    /// Parses one `order_by` entry: a key, then ASC (the default) or DESC.
    pub fn parse(text: &str) -> Result<Order, SearchError> {
        Order::parse_for(text, Subject::Runs)
    }

    /// Parses one `order_by` entry of MLflow's experiment search (`name`, `creation_time`, …).
    pub fn parse_experiments(text: &str) -> Result<Order, SearchError> {
        Order::parse_for(text, Subject::Experiments)
    }

    /// Parses one `order_by` entry of the search over `subject`.
    pub fn parse_for(text: &str, subject: Subject) -> Result<Order, SearchError> {
        let mut parser = Parser::new(text, subject)?;
        let key = parser.key()?;
        let ascending = match parser.peek() {
            None => true,
            Some(token) if token.is_keyword("ASC") => true,
            Some(token) if token.is_keyword("DESC") => false,
            Some(other) => {
                return error(format!(
                    "{} cannot follow an order key; expected ASC or DESC",
                    other.describe()
                ));
            }
        };
        if parser.tokens.len() > parser.at + 1 {
            return error(format!(
                "'{text}' has more than a key and a direction; give each key its own order_by entry"
            ));
        }
        Ok(Order { key, ascending })
    }
}

/// Orders runs by `orders`, then by start time (newest first) and run id; a run without a key's value
/// comes after the runs that have one, in either direction.
pub fn compare(orders: &[Order], a: &impl SearchableRun, b: &impl SearchableRun) -> Ordering {
    for order in orders {
        let ordering = match &order.key {
            Key::Metric(_) | Key::Time(_) => {
                compare_present(number_of(&order.key, a), number_of(&order.key, b), order, |x, y| {
                    x.total_cmp(y)
                })
            }
            key => compare_present(text_of(key, a), text_of(key, b), order, |x, y| x.cmp(y)),
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    // Newest first: b against a. A run without a start time compares as None, the least, so it comes last.
    b.time_attribute(TimeAttribute::StartTime)
        .cmp(&a.time_attribute(TimeAttribute::StartTime))
        .then_with(|| {
            a.text_attribute(TextAttribute::RunId)
                .cmp(&b.text_attribute(TextAttribute::RunId))
        })
}

/// One item's value of one order key, read once.
enum SortValue<'a> {
    Number(Option<f64>),
    Text(Option<&'a str>),
}

/// An item with its order keys, then its start time and id (the tie-breaks).
type Keyed<'a, T> = (Vec<SortValue<'a>>, Option<i64>, Option<&'a str>, &'a T);

/// Sorts `items` as [`compare`] orders them, reading each item's keys once instead of at every comparison
/// (a search over 100,000 runs sorts thousands of matches; each read is a map lookup).
pub fn sort<'a, T: SearchableRun>(orders: &[Order], items: &mut Vec<&'a T>) {
    let mut keyed: Vec<Keyed<'a, T>> = items
        .drain(..)
        .map(|item| {
            let values = orders
                .iter()
                .map(|order| match &order.key {
                    Key::Metric(_) | Key::Time(_) => SortValue::Number(number_of(&order.key, item)),
                    key => SortValue::Text(text_of(key, item)),
                })
                .collect();
            (
                values,
                item.time_attribute(TimeAttribute::StartTime),
                item.text_attribute(TextAttribute::RunId),
                item,
            )
        })
        .collect();
    keyed.sort_by(|a, b| {
        for ((order, x), y) in orders.iter().zip(&a.0).zip(&b.0) {
            let ordering = match (x, y) {
                (SortValue::Number(x), SortValue::Number(y)) => compare_present(*x, *y, order, |x, y| x.total_cmp(y)),
                (SortValue::Text(x), SortValue::Text(y)) => compare_present(*x, *y, order, |x, y| x.cmp(y)),
                _ => Ordering::Equal,
            };
            if ordering != Ordering::Equal {
                return ordering;
            }
        }
        b.1.cmp(&a.1).then_with(|| a.2.cmp(&b.2))
    });
    items.extend(keyed.into_iter().map(|(_, _, _, item)| item));
}

fn compare_present<T>(a: Option<T>, b: Option<T>, order: &Order, compare: impl Fn(&T, &T) -> Ordering) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => {
            let ordering = compare(&a, &b);
            if order.ascending { ordering } else { ordering.reverse() }
        }
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests;
