//! Finding the line of a key path in the YAML text, for error messages.

/// Finds the line of a key path in the YAML text, for error messages.
pub(super) struct Locator {
    lines: Vec<(Vec<String>, usize)>,
}

impl Locator {
    pub(super) fn new(text: &str) -> Locator {
        use yaml_rust2::parser::{Event, Parser};
        enum Frame {
            Map { key: Option<String> },
            Seq { index: usize },
        }
        let mut lines = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        let path_of = |stack: &[Frame]| -> Vec<String> {
            stack
                .iter()
                .filter_map(|f| match f {
                    Frame::Map { key } => key.clone(),
                    Frame::Seq { index } => Some(index.to_string()),
                })
                .collect()
        };
        // Called when a value (scalar or container) completes at the current level.
        fn advance(stack: &mut [Frame]) {
            match stack.last_mut() {
                Some(Frame::Map { key }) => *key = None,
                Some(Frame::Seq { index }) => *index += 1,
                None => {}
            }
        }
        while let Ok((event, mark)) = parser.next_token() {
            let line = mark.line().max(1);
            match event {
                Event::StreamEnd => break,
                Event::Scalar(s, ..) => {
                    if let Some(Frame::Map { key: key @ None }) = stack.last_mut() {
                        *key = Some(s);
                        lines.push((path_of(&stack), line));
                    } else {
                        if matches!(stack.last(), Some(Frame::Seq { .. })) {
                            lines.push((path_of(&stack), line));
                        }
                        advance(&mut stack);
                    }
                }
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    if matches!(stack.last(), Some(Frame::Seq { .. })) {
                        lines.push((path_of(&stack), line));
                    }
                    stack.push(if matches!(event, Event::MappingStart(..)) {
                        Frame::Map { key: None }
                    } else {
                        Frame::Seq { index: 0 }
                    });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    advance(&mut stack);
                }
                _ => {}
            }
        }
        Locator { lines }
    }

    /// The line of the deepest prefix of `path` that appears in the file.
    pub(super) fn line(&self, path: &[String]) -> Option<usize> {
        (1..=path.len()).rev().find_map(|n| {
            self.lines
                .iter()
                .find(|(p, _)| p.as_slice() == &path[..n])
                .map(|(_, line)| *line)
        })
    }
}
