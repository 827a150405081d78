# The repository as a bosh release directory: what `bosh create-release` and `bosh
# finalize-release` read, and bosh-release/build packing the same jobs and packages they would.
# The bosh CLI is not needed: the specs check the files it reads and rebuild, from its rules, the
# archives it would write.
require 'digest'
require_relative 'spec_helper'

RSpec.describe 'the release directory' do
  def repo_path(*path)
    File.join(BerthSpec::REPO, *path)
  end

  def load_yaml(*path)
    YAML.safe_load(File.read(repo_path(*path)))
  end

  it 'has config/final.yml with the name and blobstore provider bosh needs, and nothing in bosh-release/config' do
    final = load_yaml('config', 'final.yml')
    expect(final['name']).to eq('berth')
    expect(final).not_to have_key('final_name')
    expect(final.dig('blobstore', 'provider')).to eq('local')
    expect(Dir.glob(repo_path('bosh-release', 'config', '*'))).to be_empty
  end

  it 'has config/blobs.yml, a map of blobs that is empty: the binaries are never blobs of the repository' do
    expect(load_yaml('config', 'blobs.yml')).to eq({})
  end

  it "keeps out of git what bosh and the operator's build put in the release directory, and nothing bosh commits" do
    ignored = lambda do |path|
      _, status = Open3.capture2e('git', '-C', BerthSpec::REPO, 'check-ignore', '-q', '--no-index', path)
      status.success?
    end
    %w[src/berth/berth-registry src/berth/berth-cacher config/private.yml blobs/x/y.tgz .blobs/abc
       dev_releases/berth/berth-0+dev.1.yml .dev_builds/jobs/berth-registry/index.yml
       releases/berth/berth-1.0.0.tgz .final_builds/jobs/berth-registry/abc.tgz
       .final_builds/packages/berth/abc.tgz].each do |path|
      expect(ignored.call(path)).to be(true), "#{path} should be git-ignored"
    end
    %w[config/final.yml config/blobs.yml releases/berth/berth-1.0.0.yml releases/berth/index.yml
       .final_builds/jobs/berth-registry/index.yml .final_builds/packages/berth/index.yml
       packages/berth/spec jobs/berth-registry/spec].each do |path|
      expect(ignored.call(path)).to be(false), "#{path} should not be git-ignored"
    end
  end

  describe 'bosh-release/place-binaries and bosh-release/build' do
    let(:bin) do
      dir = File.join(tmp, 'bin')
      FileUtils.mkdir_p(dir)
      # Distinct contents, so that a mix-up of the two shows.
      { 'berth-registry' => '/bin/true', 'berth-cacher' => '/bin/false' }.each { |name, elf| FileUtils.cp(elf, File.join(dir, name)) }
      dir
    end
    let(:src) { File.join(tmp, 'src') }

    def place
      Open3.capture3(repo_path('bosh-release', 'place-binaries'), '--bin-dir', bin, '--src-dir', src)
    end

    def unpack(tgz)
      dir = Dir.mktmpdir('unpacked', tmp)
      run!({}, 'tar', '-xzf', tgz, '-C', dir)
      dir
    end

    # Entries as `tar -tv` shows them: type and mode, and each file's bytes.
    def contents(tgz)
      listing = run!({}, 'tar', '-tvzf', tgz).lines.map { |line| line.split.values_at(5, 0) }.sort
      dir = unpack(tgz)
      files = Dir.glob('**/*', base: dir).select { |f| File.file?(File.join(dir, f)) }.sort
      [listing, files.to_h { |f| [f, File.binread(File.join(dir, f))] }]
    end

    # A bosh CLI rule: 0755 when the owner may execute the source file, else 0644.
    def bosh_mode(path)
      File.stat(path).mode & 0o100 == 0 ? '-rw-r--r--' : '-rwxr-xr-x'
    end

    # What `bosh create-release` packs for a job: its spec as job.MF, monit, properties_schema.json
    # when present, and the templates its spec lists.
    def bosh_job(name)
      dir = repo_path('jobs', name)
      spec = YAML.safe_load(File.read(File.join(dir, 'spec')))
      files = { 'job.MF' => File.join(dir, 'spec'), 'monit' => File.join(dir, 'monit') }
      schema = File.join(dir, 'properties_schema.json')
      files['properties_schema.json'] = schema if File.file?(schema)
      spec['templates'].each_key { |t| files["templates/#{t}"] = File.join(dir, 'templates', t) }
      expected(files)
    end

    # What it packs for a package: packaging and what each `files` glob matches under src/ (the
    # repository has no blobs), failing as bosh does when a glob matches nothing.
    def bosh_package(name)
      dir = repo_path('packages', name)
      spec = YAML.safe_load(File.read(File.join(dir, 'spec')))
      files = { 'packaging' => File.join(dir, 'packaging') }
      spec['files'].each do |glob|
        matches = Dir.glob(glob, base: src).select { |f| File.file?(File.join(src, f)) }
        raise "bosh create-release would fail: Missing files for pattern '#{glob}'" if matches.empty?

        matches.each { |f| files[f] = File.join(src, f) }
      end
      expected(files)
    end

    def expected(files)
      dirs = files.keys.flat_map { |f| f.split('/')[0...-1].each_index.map { |i| f.split('/')[0..i].join('/') } }.uniq
      listing = files.map { |f, source| ["./#{f}", bosh_mode(source)] } +
                (['.'] + dirs).map { |d| ["#{d == '.' ? '.' : "./#{d}"}/", 'drwxr-xr-x'] }
      [listing.sort, files.transform_values { |source| File.binread(source) }.sort.to_h]
    end

    it 'places each file the package lists under src/, where bosh create-release looks for it' do
      _, err, status = place
      expect(status).to be_success, err
      expect(File.binread(File.join(src, 'berth', 'berth-registry'))).to eq(File.binread('/bin/true'))
      expect(File.binread(File.join(src, 'berth', 'berth-cacher'))).to eq(File.binread('/bin/false'))
      expect(bosh_package('berth')[1].keys).to eq(%w[berth/berth-cacher berth/berth-registry packaging])
    end

    it 'builds jobs and packages with the entries, modes and bytes bosh create-release packs from the placed binaries' do
      expect(place[2]).to be_success
      out = File.join(tmp, 'berth.tgz')
      _, err, status = Open3.capture3(repo_path('bosh-release', 'build'), '--bin-dir', bin, '--version', '1', '--out', out)
      expect(status).to be_success, err
      release = unpack(out)
      names = Dir.children(repo_path('jobs')).sort
      expect(Dir.children(File.join(release, 'jobs')).sort).to eq(names.map { |n| "#{n}.tgz" }.sort)
      names.each do |name|
        expect(contents(File.join(release, 'jobs', "#{name}.tgz"))).to eq(bosh_job(name)), "job #{name}"
      end
      expect(Dir.children(File.join(release, 'packages'))).to eq(['berth.tgz'])
      expect(contents(File.join(release, 'packages', 'berth.tgz'))).to eq(bosh_package('berth'))
    end

    it 'refuses a binary the stemcells cannot run and then places nothing' do
      fake = File.join(tmp, 'fake-bin')
      FileUtils.mkdir_p(fake)
      File.write(File.join(fake, 'objdump'), "#!/bin/sh\necho '0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.38) memcpy'\n")
      File.chmod(0o755, File.join(fake, 'objdump'))
      _, err, status = Open3.capture3({ 'PATH' => "#{fake}:#{ENV.fetch('PATH')}" },
                                      repo_path('bosh-release', 'place-binaries'), '--bin-dir', bin, '--src-dir', src)
      expect(status).not_to be_success
      expect(err).to match(/berth-registry needs GLIBC_2\.38/)
      expect(Dir.exist?(src)).to be(false)
    end
  end
end
