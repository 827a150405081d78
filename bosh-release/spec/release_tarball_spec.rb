# bosh-release/build: the release tarball's structure, its checksums, and the binary policy it enforces.
require 'digest'
require_relative 'spec_helper'

RSpec.describe 'bosh-release/build' do
  def build(bin_dir, out, env = {})
    script = File.join(BerthSpec::REPO, 'bosh-release', 'build')
    Open3.capture3(env, script, '--bin-dir', bin_dir, '--version', '1.2.3', '--out', out)
  end

  def unpack(tgz, into)
    FileUtils.mkdir_p(into)
    out, status = Open3.capture2e('tar', '-xzf', tgz, '-C', into)
    raise out unless status.success?

    into
  end

  def repo_file(*path)
    File.binread(File.join(BerthSpec::REPO, *path))
  end

  # Small ELF stand-ins for the binaries where only the tarball's shape matters.
  def stand_ins
    dir = File.join(tmp, 'stand-ins')
    FileUtils.mkdir_p(dir)
    %w[berth-registry berth-cacher].each { |name| FileUtils.cp('/bin/true', File.join(dir, name)) }
    dir
  end

  context 'with the real binaries' do
    before(:context) do
      @work = Dir.mktmpdir('berth-release-spec')
      bin = File.join(@work, 'bin')
      FileUtils.mkdir_p(bin)
      FileUtils.ln_s(BerthSpec.binary('BERTH_REGISTRY_BIN'), File.join(bin, 'berth-registry'))
      FileUtils.ln_s(BerthSpec.binary('BERTH_CACHER_BIN'), File.join(bin, 'berth-cacher'))
      _, err, status = build(bin, File.join(@work, 'berth.tgz'))
      raise "bosh-release/build failed:\n#{err}" unless status.success?

      @release = unpack(File.join(@work, 'berth.tgz'), File.join(@work, 'release'))
      @manifest = YAML.safe_load(File.read(File.join(@release, 'release.MF')))
    end
    after(:context) { FileUtils.rm_rf(@work) }

    let(:job_names) { Dir.children(File.join(BerthSpec::REPO, 'jobs')).sort }

    it 'describes the release in release.MF' do
      commit = Open3.capture2('git', '-C', BerthSpec::REPO, 'rev-parse', '--short', 'HEAD').first.strip
      expect(@manifest).to include('name' => 'berth', 'version' => '1.2.3', 'commit_hash' => commit)
      expect([true, false]).to include(@manifest['uncommitted_changes'])
      expect(@manifest['jobs'].map { |j| j['name'] }).to eq(job_names)
      expect(@manifest['packages'].map { |p| p['name'] }).to eq(['berth'])
      (@manifest['jobs'] + @manifest['packages']).each do |entry|
        expect(entry['version']).to eq(entry['fingerprint'])
        expect(entry['fingerprint']).to match(/\A\h{40}\z/)
      end
    end

    it 'lists every archive with its sha1 and nothing else' do
      archives = Dir.glob('{jobs,packages}/*.tgz', base: @release).sort
      expect(archives).to eq((job_names.map { |n| "jobs/#{n}.tgz" } + ['packages/berth.tgz']).sort)
      @manifest['jobs'].each do |job|
        expect(Digest::SHA1.file(File.join(@release, 'jobs', "#{job['name']}.tgz")).hexdigest).to eq(job['sha1'])
      end
      package = @manifest['packages'].first
      expect(Digest::SHA1.file(File.join(@release, 'packages', 'berth.tgz')).hexdigest).to eq(package['sha1'])
      expect(package['dependencies']).to eq([])
    end

    it 'packs each job as its spec, monit and listed templates' do
      @manifest['jobs'].each do |job|
        dir = unpack(File.join(@release, 'jobs', "#{job['name']}.tgz"), File.join(@work, 'jobs', job['name']))
        spec = YAML.safe_load(repo_file('jobs', job['name'], 'spec'))
        expect(File.binread(File.join(dir, 'job.MF'))).to eq(repo_file('jobs', job['name'], 'spec'))
        expect(File.binread(File.join(dir, 'monit'))).to eq(repo_file('jobs', job['name'], 'monit'))
        expect(job['packages']).to eq(spec.fetch('packages', []))
        expect(Dir.glob('templates/*', base: dir).sort).to eq(spec['templates'].keys.map { |t| "templates/#{t}" }.sort)
        spec['templates'].each_key do |template|
          expect(File.binread(File.join(dir, 'templates', template))).to eq(repo_file('jobs', job['name'], 'templates', template))
        end
      end
    end

    it "has monit watch the pidfile bpm writes for each job's process" do
      job_names.each do |name|
        monit = repo_file('jobs', name, 'monit')
        template = release_job(name).templates.key('config/bpm.yml')
        if template.nil?
          expect(monit).to be_empty, "#{name} runs no process, so its monit file stays empty"
          next
        end
        processes = YAML.safe_load(release_job(name).render('config/bpm.yml'))['processes'].map { |p| p['name'] }
        pidfiles = monit.scan(%r{with pidfile /var/vcap/sys/run/bpm/#{name}/(\S+)\.pid}).flatten
        expect(pidfiles).to eq(processes)
        expect(monit).to include(%(start program "/var/vcap/jobs/bpm/bin/bpm start #{name}"),
                                 %(stop program "/var/vcap/jobs/bpm/bin/bpm stop #{name}"))
      end
    end

    it 'packs the binaries under test with the packaging script' do
      dir = unpack(File.join(@release, 'packages', 'berth.tgz'), File.join(@work, 'package'))
      expect(Dir.glob('**/*', base: dir).select { |f| File.file?(File.join(dir, f)) }.sort)
        .to eq(%w[berth/berth-cacher berth/berth-registry packaging])
      expect(File.binread(File.join(dir, 'packaging'))).to eq(repo_file('packages', 'berth', 'packaging'))
      expect(File.binread(File.join(dir, 'berth/berth-registry'))).to eq(File.binread(BerthSpec.binary('BERTH_REGISTRY_BIN')))
      expect(File.stat(File.join(dir, 'berth/berth-cacher')).mode & 0o777).to eq(0o755)
    end
  end

  it 'writes byte-identical tarballs from the same inputs' do
    bin = stand_ins
    2.times { |i| expect(build(bin, File.join(tmp, "#{i}.tgz"))[2]).to be_success }
    expect(File.binread(File.join(tmp, '0.tgz'))).to eq(File.binread(File.join(tmp, '1.tgz')))
  end

  it 'refuses a binary that needs a newer glibc than Jammy has' do
    fake = File.join(tmp, 'fake-bin')
    FileUtils.mkdir_p(fake)
    File.write(File.join(fake, 'objdump'), "#!/bin/sh\necho '0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.38) memcpy'\n")
    File.chmod(0o755, File.join(fake, 'objdump'))
    _, err, status = build(stand_ins, File.join(tmp, 'x.tgz'), 'PATH' => "#{fake}:#{ENV.fetch('PATH')}")
    expect(status).not_to be_success
    expect(err).to match(/berth-registry needs GLIBC_2\.38, newer than the 2\.35/)
    expect(File).not_to exist(File.join(tmp, 'x.tgz'))
  end

  it 'names a missing binary' do
    _, err, status = build(File.join(tmp, 'empty'), File.join(tmp, 'x.tgz'))
    expect(status).not_to be_success
    expect(err).to include('berth-registry is missing or not executable')
  end
end
