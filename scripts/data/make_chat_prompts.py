"""Writes scripts/data/chat_prompts.jsonl: the real-model benchmark's chat workload, the kind of requests a coding
assistant gets. Every prompt here was written for this project (no dataset copied): programming tasks crossed
with languages, questions about code snippets (debug, review, explain, test, refactor), conceptual questions,
shell / git / SQL how-tos, and multi-turn conversations with a system prompt and an earlier answer.

    python scripts/data/make_chat_prompts.py            # rewrites scripts/data/chat_prompts.jsonl (deterministic)

Each row is {"messages": [...], "max_tokens": N} as scripts/bench_client.py's `--workload jsonl --backend
openai-chat` reads it. max_tokens follows the kind of question (a one-line answer needs less room than a
program), and is the same for every server the file is sent to.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("chat_prompts.jsonl")

LANGUAGES = ["Python", "JavaScript", "TypeScript", "Go", "Rust", "Java", "C++", "C#", "Kotlin", "Ruby", "C", "Swift"]

TASKS = [
    "Write a function that checks whether a string is a palindrome, ignoring case and punctuation.",
    "Write a function that returns the n-th Fibonacci number in O(log n) time.",
    "Implement binary search over a sorted array and return the index or -1.",
    "Write a function that merges two sorted lists into one sorted list.",
    "Implement an LRU cache with get and put in O(1).",
    "Write a function that parses a CSV line, handling quoted fields that contain commas.",
    "Write a program that counts word frequencies in a text file and prints the top 10.",
    "Implement a thread-safe bounded queue.",
    "Write a function that validates an email address without using a huge regex, and explain the trade-offs.",
    "Implement Dijkstra's shortest path algorithm on an adjacency list.",
    "Write a function that flattens an arbitrarily nested list.",
    "Write a function that converts a Roman numeral to an integer.",
    "Implement a trie with insert, search and startsWith.",
    "Write a function that debounces another function.",
    "Write a retry helper with exponential backoff and jitter.",
    "Implement a rate limiter using the token bucket algorithm.",
    "Write a function that detects a cycle in a linked list.",
    "Write a small command-line tool that renames all files in a folder to lowercase.",
    "Write a function that computes the Levenshtein distance between two strings.",
    "Implement quicksort and explain its worst case.",
    "Write a function that groups anagrams from a list of words.",
    "Write code that reads a JSON config file and falls back to defaults for missing keys.",
    "Implement a min-heap with push, pop and peek.",
    "Write a function that returns all permutations of a list.",
    "Write an HTTP GET request with a timeout and error handling, using the standard library if possible.",
    "Write a function that formats a byte count as a human-readable string (KB, MB, GB).",
    "Implement matrix multiplication for two 2D arrays and check the dimensions.",
    "Write a function that finds the longest common prefix of a list of strings.",
    "Write a producer-consumer example with two workers.",
    "Implement a simple event emitter with on, off and emit.",
    "Write a function that checks whether parentheses, brackets and braces in a string are balanced.",
    "Write a function that rotates an N x N matrix by 90 degrees in place.",
    "Write a function that parses ISO 8601 dates and returns the day of the week.",
    "Implement union-find with path compression.",
    "Write a function that removes duplicates from a list while keeping the order.",
    "Write a function that splits a list into chunks of size n.",
    "Implement a simple key-value store that persists to a file.",
    "Write a function that converts snake_case to camelCase and back.",
    "Write unit tests for a function that adds two money amounts stored as integer cents.",
    "Write a function that walks a directory tree and returns the total size of all files.",
]

SNIPPETS = [
    (
        "Python",
        """def average(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)

print(average([]))""",
    ),
    (
        "Python",
        """def add_item(item, items=[]):
    items.append(item)
    return items

print(add_item(1))
print(add_item(2))""",
    ),
    (
        "JavaScript",
        """for (var i = 0; i < 3; i++) {
  setTimeout(function () {
    console.log(i);
  }, 100);
}""",
    ),
    (
        "JavaScript",
        """async function loadAll(urls) {
  const results = [];
  urls.forEach(async (url) => {
    const res = await fetch(url);
    results.push(await res.json());
  });
  return results;
}""",
    ),
    (
        "Go",
        """func main() {
    var wg sync.WaitGroup
    counter := 0
    for i := 0; i < 1000; i++ {
        wg.Add(1)
        go func() {
            counter++
            wg.Done()
        }()
    }
    wg.Wait()
    fmt.Println(counter)
}""",
    ),
    (
        "Rust",
        """fn longest(a: &str, b: &str) -> &str {
    if a.len() > b.len() { a } else { b }
}""",
    ),
    (
        "Rust",
        """let mut v = vec![1, 2, 3];
let first = &v[0];
v.push(4);
println!("{}", first);""",
    ),
    (
        "SQL",
        """SELECT c.name, COUNT(o.id) AS orders
FROM customers c
LEFT JOIN orders o ON o.customer_id = c.id
WHERE o.created_at > '2024-01-01'
GROUP BY c.name;""",
    ),
    (
        "Java",
        """public boolean same(String a, String b) {
    return a == b;
}""",
    ),
    (
        "C",
        """char *copy(const char *s) {
    char buf[256];
    strcpy(buf, s);
    return buf;
}""",
    ),
    (
        "C++",
        """std::vector<int> v = {1, 2, 3, 4};
for (auto it = v.begin(); it != v.end(); ++it) {
    if (*it % 2 == 0) v.erase(it);
}""",
    ),
    (
        "Python",
        """import threading

balance = 0

def deposit(n):
    global balance
    for _ in range(n):
        balance += 1

threads = [threading.Thread(target=deposit, args=(100000,)) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(balance)""",
    ),
    (
        "TypeScript",
        """interface User { id: number; name?: string }

function greet(u: User) {
  return "Hello, " + u.name.toUpperCase();
}""",
    ),
    (
        "Python",
        """with open("data.txt") as f:
    lines = f.readlines()
for i in range(len(lines)):
    if lines[i].strip() == "":
        del lines[i]""",
    ),
    (
        "Bash",
        """for f in $(ls *.txt); do
  cat $f | grep error > $f.errors
done""",
    ),
    (
        "Python",
        """import pandas as pd
df = pd.read_csv("sales.csv")
df[df["region"] == "EU"]["price"] = df["price"] * 1.2""",
    ),
]

SNIPPET_ASKS = [
    ("This {lang} code does not do what I expect. What is wrong with it and how do I fix it?\n\n```\n{code}\n```", 384),
    ("Can you review this {lang} code and point out bugs, style problems and edge cases?\n\n```\n{code}\n```", 512),
    ("Explain line by line what this {lang} code does.\n\n```\n{code}\n```", 384),
    ("Write unit tests for this {lang} code that would have caught its bug.\n\n```\n{code}\n```", 512),
    (
        "Refactor this {lang} code to be correct and idiomatic, and explain the changes briefly.\n\n```\n{code}\n```",
        512,
    ),
]

QUESTIONS = [
    "What is the difference between a process and a thread?",
    "When should I use a tuple instead of a list in Python?",
    "Explain the difference between `==` and `===` in JavaScript.",
    "What does the `async` keyword actually do in Python, and when does it not help?",
    "What is a race condition? Give a short example.",
    "Explain Big-O notation to a beginner with three examples.",
    "What is the difference between an abstract class and an interface in Java?",
    "How does garbage collection work in Go?",
    "What are Rust lifetimes and why does the borrow checker need them?",
    "What is the difference between TCP and UDP, and when would I pick UDP?",
    "Explain what a database index is and when it makes queries slower.",
    "What is dependency injection and is it worth it in a small project?",
    "What does `volatile` mean in C, and is it enough for thread safety?",
    "How do I choose between REST and gRPC for a new internal service?",
    "What is the difference between optimistic and pessimistic locking?",
    "Explain closures with an example in JavaScript.",
    "What is memoization and how is it different from caching?",
    "Why is floating point 0.1 + 0.2 not equal to 0.3?",
    "What is the CAP theorem, in plain words?",
    "How does HTTPS protect a request, step by step?",
    "What is the difference between a shallow copy and a deep copy?",
    "What are generics and why did Go add them?",
    "Explain the event loop in Node.js.",
    "What is tail-call optimization and which languages guarantee it?",
    "How does a hash map handle collisions?",
    "What is the difference between unit, integration and end-to-end tests?",
    "Explain SQL JOIN types with a tiny example table.",
    "What is a memory leak in a garbage-collected language?",
    "What does idempotent mean for an HTTP API?",
    "How do I read a stack trace to find the cause of an exception?",
    "What is the difference between `git merge` and `git rebase`?",
    "Explain the difference between concurrency and parallelism.",
    "What are the SOLID principles? One sentence each.",
    "What is a mutex and what is a semaphore?",
    "Why would I use a virtual environment in Python?",
    "How does `const` differ from `readonly` in TypeScript?",
    "What is the N+1 query problem and how do I avoid it in an ORM?",
    "What is the difference between stack and heap memory?",
    "When is recursion a bad idea?",
    "Explain what a Docker image layer is.",
]

HOWTOS = [
    ("How do I undo the last git commit but keep the changes in my working tree?", 192),
    ("How do I find which process is listening on port 8080 on Linux?", 192),
    ("Write a bash one-liner that finds the 10 largest files under the current directory.", 192),
    ("How do I squash my last three commits into one?", 256),
    ("Write a Dockerfile for a small Python web app that uses a requirements.txt.", 384),
    ("How do I set up a Python project with pyproject.toml and a src layout?", 384),
    ("Write a GitHub Actions workflow that runs pytest on Python 3.11 and 3.12.", 384),
    ("How do I recover a branch I deleted by accident in git?", 256),
    ("Write a SQL query that returns the second highest salary from an employees table.", 192),
    ("Write a SQL query that finds duplicate emails in a users table.", 192),
    ("How do I profile a slow Python script to see which functions take the time?", 384),
    ("How can I make a cron job run every weekday at 7:30?", 128),
    ("Write a Makefile with build, test and clean targets for a C project.", 256),
    ("How do I resolve a merge conflict in a file from the command line?", 256),
    ("Write an nginx config that proxies /api to localhost:8000 and serves static files from /var/www.", 384),
    ("How do I tail a log file and only show lines that contain ERROR or WARN?", 128),
    ("Write a regex that matches a US ZIP code with an optional +4 part, and explain it.", 192),
    ("How do I create a PostgreSQL index concurrently without locking writes?", 256),
    ("Write a Python script that downloads a list of URLs in parallel with a limit of 5 at a time.", 512),
    ("How do I debug a segmentation fault in a C program with gdb?", 384),
    ("Write a systemd unit file for a service that restarts on failure.", 256),
    ("How do I convert a list of dicts to a pandas DataFrame and save it as Parquet?", 192),
    ("Write a shell script that backs up a folder to a timestamped tar.gz and keeps only the last 7.", 384),
    ("How do I write a .gitignore for a Node.js project?", 192),
    ("How do I measure the time a function takes in Go?", 192),
]

SYSTEMS = [
    "You are a helpful coding assistant. Answer concisely and show code when it helps.",
    "You are a senior software engineer doing code review. Be direct and specific.",
    "You are a patient tutor for people learning to program. Explain step by step.",
]

CONVERSATIONS = [
    [
        ("user", "How do I read a file line by line in Python?"),
        (
            "assistant",
            "Open it in a `with` block and iterate over the file object:\n\n```python\nwith open(path) as f:\n    for line in f:\n        print(line.rstrip())\n```",
        ),
        ("user", "And how do I skip the first line, which is a header?"),
    ],
    [
        ("user", "Write a function in JavaScript that sums an array of numbers."),
        ("assistant", "```js\nfunction sum(xs) {\n  return xs.reduce((a, b) => a + b, 0);\n}\n```"),
        ("user", "Now make it ignore values that are not numbers, and add JSDoc."),
    ],
    [
        ("user", "My Go program panics with 'assignment to entry in nil map'. Why?"),
        (
            "assistant",
            "You declared a map with `var m map[string]int` and wrote to it before creating it. A nil map can be read but not written; create it with `m := make(map[string]int)`.",
        ),
        ("user", "What about a map inside a struct? Where should I initialize it?"),
    ],
    [
        ("user", "What is a Python decorator?"),
        (
            "assistant",
            "A decorator is a function that takes a function and returns a new one, usually wrapping it to add behaviour; `@deco` above a `def` is shorthand for `f = deco(f)`.",
        ),
        ("user", "Show me a decorator that times a function and one that caches its results."),
    ],
    [
        ("user", "Write a SQL table for blog posts with an author, a title, a body and timestamps."),
        (
            "assistant",
            "```sql\nCREATE TABLE posts (\n  id SERIAL PRIMARY KEY,\n  author_id INT NOT NULL REFERENCES users(id),\n  title TEXT NOT NULL,\n  body TEXT NOT NULL,\n  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()\n);\n```",
        ),
        (
            "user",
            "Add tags, so that a post can have many tags and a tag many posts. And a query for the posts of one tag.",
        ),
    ],
    [
        ("user", "In Rust, how do I return an error from main?"),
        (
            "assistant",
            "Make main return a `Result`: `fn main() -> Result<(), Box<dyn std::error::Error>>`, use `?` inside, and end with `Ok(())`.",
        ),
        ("user", "How would I define my own error type instead of the boxed one?"),
    ],
]


def rows(rng: random.Random) -> list[dict]:
    out: list[dict] = []

    def add(messages: list[dict], max_tokens: int) -> None:
        if rng.random() < 0.3:  # some clients send a system prompt, most do not
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}, *messages]
        out.append({"messages": messages, "max_tokens": max_tokens})

    pairs = [(t, lang) for t in TASKS for lang in LANGUAGES]
    for task, lang in rng.sample(pairs, 140):
        add([{"role": "user", "content": f"{task} Use {lang}."}], 512)
    asks = [(s, a) for s in SNIPPETS for a in SNIPPET_ASKS]
    for (lang, code), (ask, max_tokens) in rng.sample(asks, 60):
        add([{"role": "user", "content": ask.format(lang=lang, code=code)}], max_tokens)
    for q in QUESTIONS:
        add([{"role": "user", "content": q}], 256)
    for q, max_tokens in HOWTOS:
        add([{"role": "user", "content": q}], max_tokens)
    for conv in CONVERSATIONS:
        for system in SYSTEMS[:2]:  # each conversation twice: under two system prompts
            turns = [{"role": r, "content": c} for r, c in conv]
            out.append({"messages": [{"role": "system", "content": system}, *turns], "max_tokens": 384})
    rng.shuffle(out)  # kinds interleaved, as a server sees them
    return out


def main() -> None:
    data = rows(random.Random(2026))
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
    print(f"{OUT}: {len(data)} conversations, {sum(r['max_tokens'] for r in data)} max_tokens in all")


if __name__ == "__main__":
    main()
